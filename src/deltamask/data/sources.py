"""Image data sets by spec string.

A data set is named by a short *spec* so that command lines and configs stay
declarative (see :data:`DATASET_FORMS`).  Every loader returns an
:class:`ImageDataset` holding uint8 RGB images ``[n, h, w, 3]`` plus int64 labels,
with a held-out test split that the server uses for evaluation.  Whenever the
source has no test split, a seeded, stratified split is made, so the same seed
always gives the same split.

``datasets`` and ``flwr-datasets`` are optional dependencies; they are imported
only by the code paths that need them (``hf:`` specs and :func:`partition`).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("deltamask")

__all__ = [
    "DATASET_FORMS",
    "DataError",
    "ImageDataset",
    "ImageSource",
    "take",
    "load_dataset",
    "subsample",
]

DATASET_FORMS: list[str] = [
    "fashion-mnist      Fashion-MNIST from its 4 IDX .gz files "
    "(Debian: apt-get install dataset-fashion-mnist)",
    "digits             scikit-learn's 8x8 handwritten digits (bundled, no download)",
    "npz:PATH           .npz with uint8 x [n,h,w] or [n,h,w,c] and int y; "
    "optional x_test/y_test, optional classes",
    "folder:PATH        PATH/<class>/*.png|jpg|...; optional PATH/train and PATH/test",
    "hf:NAME[:TRAIN[:TEST]]  Hugging Face dataset (hub name, local script/data dir, "
    "or a directory written by save_to_disk)",
]

FASHION_MNIST_ENV = "DELTAMASK_FASHION_MNIST"
# Module-level so tests (and unusual installs) can point it elsewhere.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


class DataError(Exception):
    """User-facing data problem; message says what was wrong and how to fix it."""


#: an image file with more pixels than this is skipped as a decompression bomb (PIL's own default limit)
MAX_IMAGE_PIXELS = 89_478_485
#: a ``folder:`` data set fails when more than this fraction of its image files cannot be read
MAX_SKIPPED_FRACTION = 0.5
#: an ``npz:`` file whose arrays declare more than this (in their ``.npy`` headers, one or all together) is
#: refused before any is read
MAX_NPZ_ARRAY_BYTES = 8 << 30


def _forms_text() -> str:
    return "\n".join("  " + form for form in DATASET_FORMS)


@dataclass
class ImageDataset:
    """Train/test image arrays of one data set, in the uniform layout all code expects.

    Images are uint8 ``[n, h, w, 3]`` (grayscale already expanded to RGB), as arrays or, from
    ``load_dataset(..., stream=True)``, as :class:`ImageSource` (read on demand); labels are
    int64 in ``0..num_classes-1`` and index into ``classes``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    #: image files left out because they could not be read or are decompression bombs: "path: why"
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Catch layout mistakes at construction instead of deep inside training.
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise DataError(
                    f"{self.name}: x_{split} must be uint8 [n, h, w, 3], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(
                    f"{self.name}: y_{split} must be 1-D with one label per image, "
                    f"got shape {tuple(y.shape)} for {len(x)} images"
                )
            y = y.astype(np.int64, copy=False)
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise DataError(
                    f"{self.name}: y_{split} has labels outside 0..{len(self.classes) - 1}"
                )
            setattr(self, f"y_{split}", y)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)


class ImageSource:
    """Streamed uint8 RGB images ``[n, h, w, 3]``: decoded from their files (``folder:``) or the Arrow
    table (``hf:``) only when read, a chunk at a time, so a data set never sits in RAM whole.

    It answers what the rest of the code asks of an image array: ``len``, ``shape``, ``dtype``,
    ``ndim``; ``src[int]`` is one image and ``src[slice | index array]`` a uint8 array of those images.
    :func:`take` (used by subsampling, splitting and partitioning) returns another source over a subset
    without reading anything. ``np.asarray(src)`` reads it all (what the eager loaders return).
    ``read(indices)`` decodes images by their index in the underlying collection into
    ``[k, h, w, 3]`` (every image already at the source's size)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, read: Any, n: int, hw: tuple[int, int], index: np.ndarray | None = None) -> None:
        self._read = read
        self.hw = (int(hw[0]), int(hw[1]))
        self.index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), *self.hw, 3)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: np.ndarray) -> "ImageSource":
        return ImageSource(self._read, 0, self.hw, self.index[np.asarray(idx, dtype=np.int64)])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self.index[[int(key)]])[0]
        rows = self.index[key]
        if len(rows) == 0:
            return np.zeros((0, *self.hw, 3), np.uint8)
        return self._read(rows)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)


Images = "np.ndarray | ImageSource"


def take(x: Any, idx: np.ndarray) -> Any:
    """Images ``idx`` of ``x``: a copy for an array, a lazy subset (nothing read) for an ImageSource."""
    return x.take(idx) if isinstance(x, ImageSource) else x[idx]


# --------------------------------------------------------------------------- helpers


def _to_rgb(x: np.ndarray, what: str) -> np.ndarray:
    """Expand [n,h,w] / [n,h,w,1] to [n,h,w,3]; drop alpha of [n,h,w,4]."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"{what}: images must be [n, h, w] or [n, h, w, c], got shape {tuple(x.shape)}"
        )
    c = x.shape[-1]
    if c == 1:
        return np.ascontiguousarray(np.repeat(x, 3, axis=-1))
    if c == 3:
        return np.ascontiguousarray(x)
    if c == 4:
        return np.ascontiguousarray(x[..., :3])
    raise DataError(
        f"{what}: images must have 1 (gray), 3 (RGB) or 4 (RGBA) channels in the last "
        f"axis, got {c} (shape {tuple(x.shape)}); channels-first arrays must be "
        f"transposed to [n, h, w, c]"
    )


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; returns sorted (train_idx, test_idx).

    Each class contributes ``round(n_c * test_fraction)`` samples to test, so class
    proportions are kept.  Classes with one sample stay in train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * test_fraction))
        k = min(k, len(idx) - 1)  # keep at least one training example per class
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    if len(test) == 0 or len(train) == 0:
        raise DataError(
            f"cannot split {len(y)} samples into train and test with "
            f"test_fraction={test_fraction}; provide more data or an explicit test split"
        )
    return train.astype(np.int64), test.astype(np.int64)


def _split_dataset(
    name: str, x: np.ndarray, y: np.ndarray, classes: list[str], test_fraction: float, seed: int,
    skipped: list[str] | None = None,
) -> ImageDataset:
    tr, te = _stratified_split(y, test_fraction, seed)
    return ImageDataset(name, take(x, tr), y[tr], take(x, te), y[te], classes, list(skipped or []))


def _stack_pil(images: Sequence[Any], names: Sequence[str], what: str) -> np.ndarray:
    """Convert PIL images to RGB and stack them, resizing to the most common size.

    Ties between equally common sizes go to the size seen first.
    """
    from PIL import Image

    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8)
    rgb = []
    for img, nm in zip(images, names):
        try:
            rgb.append(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            raise DataError(f"{what}: cannot convert image {nm} to RGB: {exc}") from exc
    size = Counter(im.size for im in rgb).most_common(1)[0][0]
    out = np.empty((len(rgb), size[1], size[0], 3), np.uint8)
    for i, im in enumerate(rgb):
        if im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        out[i] = np.asarray(im, dtype=np.uint8)
    return out


# ------------------------------------------------------------------- fashion-mnist


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzip'ed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; re-download or reinstall the file") from exc
    header = 4 + 4 * ndim
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (bad magic number)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims}, "
            f"found {len(data) - header} data bytes"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir: str | None) -> ImageDataset:
    candidates: list[Path] = []
    if data_dir:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if os.environ.get(FASHION_MNIST_ENV):
        candidates.append(Path(os.environ[FASHION_MNIST_ENV]))
    candidates.append(Path(FASHION_MNIST_SYSTEM_DIR))
    for directory in candidates:
        files = {k: _find_idx_file(directory, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if all(files.values()):
            break
    else:
        searched = "\n".join(f"  {d}" for d in candidates)
        needed = ", ".join(f"{s}.gz" for s in FASHION_MNIST_FILES.values())
        raise DataError(
            "Fashion-MNIST not found. Searched:\n"
            f"{searched}\n"
            "To fix: on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` "
            f"(installs to {FASHION_MNIST_SYSTEM_DIR}), or put the 4 IDX files "
            f"({needed}) in a directory and pass it as data_dir or set "
            f"${FASHION_MNIST_ENV} to it."
        )
    arrays = {}
    for key, path in files.items():
        is_images = key.startswith("x")
        arrays[key] = _read_idx(path, 0x803 if is_images else 0x801, 3 if is_images else 1)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(
                f"Fashion-MNIST {split} images and labels differ in length in {directory}; "
                "the files are from different releases or corrupt"
            )
    return ImageDataset(
        "fashion-mnist",
        _to_rgb(arrays["x_train"], "fashion-mnist"),
        arrays["y_train"].astype(np.int64),
        _to_rgb(arrays["x_test"], "fashion-mnist"),
        arrays["y_test"].astype(np.int64),
        list(FASHION_MNIST_CLASSES),
    )


# -------------------------------------------------------------------------- digits


def _load_digits(seed: int, test_fraction: float) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; stretch to the full uint8 range.
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    classes = [str(int(c)) for c in d.target_names]
    return _split_dataset("digits", _to_rgb(x, "digits"), y, classes, test_fraction, seed)


# ----------------------------------------------------------------------------- npz


def _npz_images(arr: np.ndarray, key: str, path: str) -> np.ndarray:
    """Validate an image array; integer arrays in 0..255 are cast to uint8."""
    what = f"npz:{path} array '{key}'"
    if arr.ndim not in (3, 4):
        raise DataError(
            f"{what} must be [n, h, w] or [n, h, w, c], got shape {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and (
            arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255)
        ):
            arr = arr.astype(np.uint8)  # documented lossless conversion
        else:
            raise DataError(
                f"{what} must be uint8 pixels 0..255, got dtype {arr.dtype}; convert it "
                "before saving, e.g. x = (x * 255).round().clip(0, 255).astype(np.uint8) "
                "for floats in [0, 1]"
            )
    return _to_rgb(arr, what)


def _npz_labels(arr: np.ndarray, key: str, path: str) -> np.ndarray:
    if arr.ndim != 1:
        raise DataError(f"npz:{path} array '{key}' must be 1-D labels, got shape {tuple(arr.shape)}")
    return arr


def _check_npz_sizes(p: Path) -> None:
    """Every array of an npz file no larger than :data:`MAX_NPZ_ARRAY_BYTES`, as its ``.npy`` header
    declares (shape x item size), read before any array is loaded: np.load would allocate it whole."""
    import zipfile

    total = 0
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):  # np.load would read such a member whole, unchecked
                    raise DataError(f"npz:{p} holds {info.filename!r}, which is not a .npy array; save the data set with "
                                    "np.savez(PATH, x=..., y=...)")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                total += nbytes
                if nbytes > MAX_NPZ_ARRAY_BYTES or total > MAX_NPZ_ARRAY_BYTES:
                    if nbytes <= MAX_NPZ_ARRAY_BYTES:
                        raise DataError(f"npz:{p}: its arrays declare {total:,} bytes together, over the limit of "
                                        f"{MAX_NPZ_ARRAY_BYTES:,}; use folder: (streamed) for a data set this large")
                    raise DataError(
                        f"npz:{p} array '{info.filename[:-4]}' declares shape {tuple(shape)} of {dtype} = {nbytes:,} bytes, "
                        f"over the limit of {MAX_NPZ_ARRAY_BYTES:,}; use folder: (streamed) for a data set this large"
                    )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip and header errors vary; np.load below names them too
        raise DataError(f"cannot read npz:{p}: {type(exc).__name__}: {exc}") from exc


def _load_npz(path: str, seed: int, test_fraction: float) -> ImageDataset:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"npz file not found: {p}. Create it with "
            "np.savez(PATH, x=uint8 images [n,h,w(,c)], y=int labels [n]) "
            "(optionally x_test, y_test, classes)."
        )
    _check_npz_sizes(p)
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise DataError(
            f"npz:{p} contains object arrays, which are not loaded for safety; "
            "save plain numeric/string arrays instead"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - zip/format errors vary
        raise DataError(f"cannot read npz:{p}: {exc}") from exc

    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(
                f"npz:{p} has no array '{key}' (found: {sorted(arrays)}); save images as "
                "'x' and labels as 'y', e.g. np.savez(PATH, x=x, y=y)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(
            f"npz:{p} must contain both 'x_test' and 'y_test' or neither "
            f"(found: {sorted(arrays)})"
        )
    has_test = "x_test" in arrays

    x = _npz_images(arrays["x"], "x", path)
    y = _npz_labels(arrays["y"], "y", path)
    if len(x) != len(y):
        raise DataError(f"npz:{p} has {len(x)} images in 'x' but {len(y)} labels in 'y'")
    if has_test:
        xt = _npz_images(arrays["x_test"], "x_test", path)
        yt = _npz_labels(arrays["y_test"], "y_test", path)
        if len(xt) != len(yt):
            raise DataError(
                f"npz:{p} has {len(xt)} images in 'x_test' but {len(yt)} labels in 'y_test'"
            )
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(
                f"npz:{p}: 'x_test' images are {xt.shape[1:3]} but 'x' images are "
                f"{x.shape[1:3]}; save both at the same size"
            )
    else:
        xt, yt = x[:0], y[:0]

    all_y = np.concatenate([y, yt])
    if np.issubdtype(all_y.dtype, np.integer):
        if len(all_y) and all_y.min() < 0:
            raise DataError(f"npz:{p}: labels must be >= 0, found {int(all_y.min())}")
        num = int(all_y.max()) + 1 if len(all_y) else 0
        if "classes" in arrays:
            classes = [str(c) for c in arrays["classes"].tolist()]
            if len(classes) < num:
                raise DataError(
                    f"npz:{p}: 'classes' has {len(classes)} names but labels go up to {num - 1}"
                )
        else:
            classes = [str(i) for i in range(num)]
        y_int, yt_int = y.astype(np.int64), yt.astype(np.int64)
    elif all_y.dtype.kind in "US":
        # String labels: classes are the sorted distinct names.
        names, inv = np.unique(all_y, return_inverse=True)
        classes = [str(n) for n in names.tolist()]
        y_int, yt_int = inv[: len(y)].astype(np.int64), inv[len(y):].astype(np.int64)
    else:
        raise DataError(
            f"npz:{p}: labels must be integers (or strings), got dtype {all_y.dtype}; "
            "save them with y.astype(np.int64)"
        )

    name = f"npz:{p.name}"
    if has_test:
        return ImageDataset(name, x, y_int, xt, yt_int, classes)
    return _split_dataset(name, x, y_int, classes, test_fraction, seed)


# -------------------------------------------------------------------------- folder


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    """Map class name -> sorted image files for each non-hidden subfolder with images."""
    out: dict[str, list[Path]] = {}
    for sub in sorted(root.iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        files = sorted(
            f for f in sub.rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
        if files:
            out[sub.name] = files
    return out


def _screen_image(f: Path, decode: bool) -> tuple[Any, str | None]:
    """(the image, loaded, when ``decode``; else its size) or (None, why it cannot be used): unreadable,
    not an image, or more than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb). PIL's own bomb
    check is made an error here, not a warning."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return None, f"{w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
                if not decode:
                    return (w, h), None
                im.load()
                return (im.copy() if im.mode in ("RGB", "L") else im.convert("RGB")), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression bomb: {exc}"
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a damaged file
        return None, f"cannot be read: {type(exc).__name__}: {exc}"


def _screen_files(files: list[Path], labels: np.ndarray, classes: list[str], decode: bool, what: str) -> tuple[list[Path], np.ndarray, list[Any], list[str]]:
    """The usable image files (and their labels, and what :func:`_screen_image` returned for each), and the
    skipped ones as "path: why". Fails (:class:`DataError`) when more than :data:`MAX_SKIPPED_FRACTION` of
    the files, or every file of a class, cannot be used."""
    keep, ys, got, skipped = [], [], [], []
    for f, lab in zip(files, labels):
        item, why = _screen_image(f, decode)
        if why is None:
            keep.append(f)
            ys.append(int(lab))
            got.append(item)
        else:
            skipped.append(f"{f}: {why}")
    if skipped:
        log.warning("%s: skipped %d of %d image files that cannot be used, e.g. %s", what, len(skipped), len(files), skipped[0])
    if files and len(skipped) > MAX_SKIPPED_FRACTION * len(files):
        raise DataError(f"{what}: {len(skipped)} of {len(files)} image files cannot be used (more than "
                        f"{MAX_SKIPPED_FRACTION:.0%}), e.g. {skipped[0]}; delete or replace them")
    y = np.asarray(ys, np.int64)
    empty = sorted(set(np.unique(labels).tolist()) - set(np.unique(y).tolist()))
    if empty:
        raise DataError(f"{what}: no usable image left in class {classes[empty[0]]!r} (e.g. {skipped[0]}); "
                        "delete or replace the files")
    return keep, y, got, skipped


def _read_images(files: list[Path]) -> list[Any]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy() if im.mode in ("RGB", "L") else im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(
                f"cannot read image {f}: {exc}; delete or replace the file"
            ) from exc
    return images


def _common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common (w, h); ties go to the size seen first (as :func:`_stack_pil`)."""
    return Counter(sizes).most_common(1)[0][0] if sizes else (1, 1)


def _pil_to_array(im: Any, size: tuple[int, int], name: str, what: str) -> np.ndarray:
    """One PIL image as :func:`_stack_pil` stores it: RGB, resized (bilinear) to ``size`` = (w, h)."""
    from PIL import Image

    try:
        rgb = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise DataError(f"{what}: cannot convert image {name} to RGB: {exc}") from exc
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _folder_source(files: list[Path], what: str, sizes: list[tuple[int, int]]) -> ImageSource:
    """Image files streamed: sizes come from the headers (nothing decoded; :func:`_screen_files`), pixels
    when read."""
    size = _common_size(sizes)

    def read(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), size[1], size[0], 3), np.uint8)
        for k, r in enumerate(rows):
            out[k] = _pil_to_array(_read_images([files[int(r)]])[0], size, str(files[int(r)]), what)
        return out

    return ImageSource(read, len(files), (size[1], size[0]))


def _load_folder(path: str, seed: int, test_fraction: float, stream: bool = False) -> ImageDataset:
    root = Path(path).expanduser()
    layout = (
        "expected PATH/<class_name>/<image files> (or PATH/train/<class_name>/... and "
        f"PATH/test/<class_name>/...) with extensions {sorted(IMAGE_EXTENSIONS)}"
    )
    if not root.is_dir():
        raise DataError(f"folder not found: {root}; {layout}")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    if has_split:
        train_dirs, test_dirs = _class_dirs(root / "train"), _class_dirs(root / "test")
        if not train_dirs or not test_dirs:
            raise DataError(f"{root}/train or {root}/test has no class folders with images; {layout}")
    else:
        # PATH/train alone (no PATH/test) is used with a seeded split, unless it is
        # itself a class folder (images directly inside).
        only_train = _class_dirs(root / "train") if (root / "train").is_dir() else {}
        train_dirs, test_dirs = (only_train or _class_dirs(root)), {}
        if not train_dirs:
            raise DataError(f"no class folders with images in {root}; {layout}")
    classes = sorted(set(train_dirs) | set(test_dirs))
    index = {c: i for i, c in enumerate(classes)}

    def flatten(dirs: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray]:
        files, labels = [], []
        for c in sorted(dirs):
            files += dirs[c]
            labels += [index[c]] * len(dirs[c])
        return files, np.asarray(labels, np.int64)

    what = f"folder:{root}"
    train_files, y = flatten(train_dirs)
    test_files, yt = flatten(test_dirs)
    # unreadable files and decompression bombs are skipped and recorded (a streamed set checks headers only)
    train_files, y, tr_got, skipped = _screen_files(train_files, y, classes, not stream, what)
    test_files, yt, te_got, te_skipped = _screen_files(test_files, yt, classes, not stream, what) if test_files else (test_files, yt, [], [])
    skipped += te_skipped
    all_files = train_files + test_files
    if stream:
        src = _folder_source(all_files, what, tr_got + te_got)
        ntr = np.arange(len(train_files), dtype=np.int64)
        x, xt = src.take(ntr), src.take(len(train_files) + np.arange(len(test_files), dtype=np.int64))
    else:
        x_all = _stack_pil(tr_got + te_got, [str(f) for f in all_files], what)
        x, xt = x_all[: len(train_files)], x_all[len(train_files):]
    name = f"folder:{root.name}"
    if has_split:
        return ImageDataset(name, x, y, xt, yt, classes, skipped)
    return _split_dataset(name, x, y, classes, test_fraction, seed, skipped)


# ------------------------------------------------------------------------------ hf


def _hf_columns(ds: Any, what: str) -> tuple[str, str]:
    """Pick the image column (Image feature) and the label column (ClassLabel feature)."""
    import datasets

    feats = ds.features
    images = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    if not images:
        raise DataError(
            f"{what} has no column with an Image feature (columns: {dict(feats)}); "
            "cast the image column with ds.cast_column(col, datasets.Image())"
        )
    if not labels:
        raise DataError(
            f"{what} has no column with a ClassLabel feature (columns: {dict(feats)}); "
            "encode labels with ds.class_encode_column(col)"
        )

    def prefer(cols: list[str], names: tuple[str, ...]) -> str:
        for n in names:
            if n in cols:
                return n
        return cols[0]

    return prefer(images, ("image", "img", "pixel_values")), prefer(labels, ("label", "labels", "fine_label"))


def _hf_arrays(ds: Any, img_col: str, lab_col: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    images = ds[img_col]
    return (
        _stack_pil(images, [f"{what}[{i}]" for i in range(len(images))], what),
        np.asarray(ds[lab_col], np.int64),
    )


def _hf_source(
    ds: Any, img_col: str, lab_col: str, what: str, then_hw: tuple[int, int] | None = None
) -> tuple[ImageSource, np.ndarray]:
    """An hf split streamed from its Arrow table: sizes from the encoded images' headers now, pixels
    decoded (by the column's own ``Image`` feature, as the eager path) when read. ``then_hw``: a test
    split is resized to the train split's (h, w) after stacking, as :func:`_load_hf` does eagerly."""
    import io

    import datasets
    from PIL import Image

    feature = ds.features[img_col]
    raw = ds.cast_column(img_col, datasets.Image(decode=False)).select_columns([img_col])
    sizes = []
    for ex in raw.with_format("arrow").iter(batch_size=1024):
        for enc in ex[img_col].to_pylist():
            try:
                with Image.open(io.BytesIO(enc["bytes"]) if enc.get("bytes") else enc["path"]) as im:
                    w, h = im.size
                    if im.getexif().get(Image.ExifTags.Base.Orientation) in (5, 6, 7, 8):
                        w, h = h, w  # decode_example applies the EXIF rotation
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
                raise DataError(f"{what}[{len(sizes)}]: cannot read image: {exc}") from exc
            sizes.append((w, h))
    size = _common_size(sizes)
    final = then_hw if then_hw is not None and len(sizes) and then_hw != (size[1], size[0]) else None

    def read(rows: np.ndarray) -> np.ndarray:
        encoded = raw[[int(r) for r in rows]][img_col]
        out = np.empty((len(rows), size[1], size[0], 3), np.uint8)
        for k, (r, enc) in enumerate(zip(rows, encoded)):
            out[k] = _pil_to_array(feature.decode_example(enc), size, f"{what}[{int(r)}]", what)
        if final is None:
            return out
        h, w = final
        return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR)) for im in out])

    hw = final or (size[1], size[0])
    return ImageSource(read, len(sizes), hw), np.asarray(ds[lab_col], np.int64)


def _load_hf(arg: str, seed: int, test_fraction: float, stream: bool = False) -> ImageDataset:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            "hf: specs need the 'datasets' package; install it with `pip install datasets` "
            "(or `pip install deltamask[hf]`)"
        ) from exc

    # NAME may itself be a path; only split off ":SPLIT" parts when it is not.
    name, splits = arg, []
    if not Path(arg).expanduser().exists() and ":" in arg:
        name, *splits = arg.split(":")
    if not name or len(splits) > 2 or any(not s for s in splits):
        raise DataError(f"bad hf spec 'hf:{arg}'; expected hf:NAME, hf:NAME:TRAIN or hf:NAME:TRAIN:TEST")
    local = Path(name).expanduser()
    what = f"hf:{name}"

    if local.is_dir() and (
        (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
    ):
        try:
            loaded = datasets.load_from_disk(str(local))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot load saved dataset {local}: {exc}") from exc
    else:
        try:
            loaded = datasets.load_dataset(str(local) if local.exists() else name)
        except (ConnectionError, TimeoutError) as exc:
            raise DataError(_hf_offline_message(name, exc)) from exc
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
            text = str(exc)
            if "reach" in text.lower() or "offline" in text.lower() or "connect" in text.lower():
                raise DataError(_hf_offline_message(name, exc)) from exc
            raise DataError(
                f"cannot load Hugging Face dataset '{name}': {type(exc).__name__}: {text}. "
                "Check the name (e.g. 'hf:zalando-datasets/fashion_mnist') or pass a local "
                "directory written by Dataset.save_to_disk."
            ) from exc

    if isinstance(loaded, datasets.DatasetDict):
        available = list(loaded.keys())
        train_name = splits[0] if splits else ("train" if "train" in loaded else available[0])
        if len(splits) == 2:
            test_name: str | None = splits[1]
        else:
            test_name = next(
                (s for s in ("test", "validation", "valid", "val") if s in loaded and s != train_name),
                None,
            )
        for s in (train_name, test_name):
            if s is not None and s not in loaded:
                raise DataError(f"{what} has no split '{s}'; available splits: {available}")
        train_ds = loaded[train_name]
        test_ds = loaded[test_name] if test_name is not None else None
    else:
        if splits:
            raise DataError(f"{what} is a single dataset without named splits; drop ':{':'.join(splits)}'")
        train_ds, test_ds = loaded, None

    img_col, lab_col = _hf_columns(train_ds, what)
    classes = [str(c) for c in train_ds.features[lab_col].names]
    if stream:
        x, y = _hf_source(train_ds, img_col, lab_col, what)
        if test_ds is None:
            return _split_dataset(what, x, y, classes, test_fraction, seed)
        xt, yt = _hf_source(test_ds, img_col, lab_col, what, then_hw=x.hw)
        return ImageDataset(what, x, y, xt, yt, classes)
    x, y = _hf_arrays(train_ds, img_col, lab_col, what)
    if test_ds is None:
        return _split_dataset(what, x, y, classes, test_fraction, seed)
    xt, yt = _hf_arrays(test_ds, img_col, lab_col, what)
    if xt.shape[1:] != x.shape[1:] and len(xt):
        # Keep train and test at one size so downstream code can treat them alike.
        from PIL import Image

        h, w = x.shape[1:3]
        xt = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR)) for im in xt])
    return ImageDataset(what, x, y, xt, yt, classes)


def _hf_offline_message(name: str, exc: BaseException) -> str:
    return (
        f"cannot download Hugging Face dataset '{name}': the hub is unreachable "
        f"({type(exc).__name__}: {exc}). On a machine with internet run "
        f"`datasets.load_dataset('{name}').save_to_disk('DIR')`, copy DIR here and use "
        "'hf:DIR'; or, if it is already in the local HF cache, set HF_HUB_OFFLINE=1."
    )


# ------------------------------------------------------------------------ public API


def load_dataset(
    spec: str, *, seed: int = 0, test_fraction: float = 0.2, data_dir: str | None = None, stream: bool = False
) -> ImageDataset:
    """Load the data set named by ``spec`` (see :data:`DATASET_FORMS`).

    ``seed`` and ``test_fraction`` govern the stratified split made when the source
    has no test split; ``data_dir`` is where to look first for ``fashion-mnist``.
    ``stream=True``: ``folder:`` and ``hf:`` images come as :class:`ImageSource` (decoded when
    read, the same pixels as the eager arrays); the other forms are small arrays either way.
    """
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind_l = kind.lower()
    if not sep:
        if kind_l in ("fashion-mnist", "fashion_mnist", "fmnist"):
            return _load_fashion_mnist(data_dir)
        if kind_l == "digits":
            return _load_digits(seed, test_fraction)
    elif arg:
        if kind_l == "npz":
            return _load_npz(arg, seed, test_fraction)
        if kind_l == "folder":
            return _load_folder(arg, seed, test_fraction, stream)
        if kind_l == "hf":
            return _load_hf(arg, seed, test_fraction, stream)
    raise DataError(f"unknown data set spec '{spec}'; valid forms are:\n{_forms_text()}")


def _stratified_take(y: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of a class-proportional subset of size k, or None to keep all."""
    if k is None or k == 0 or k >= len(y):
        return None
    if k < 0:
        raise DataError(f"sample count must be >= 0 (0 or None keeps all), got {k}")
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (k / len(y))
    take = np.floor(quota).astype(np.int64)
    # Largest-remainder rounding so the total is exactly k (ties: lower class first).
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: k - int(take.sum())]] += 1
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(t), replace=False)
        for c, t in zip(classes, take)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _subsample_index(ds: ImageDataset, train_samples: int | None, test_samples: int | None, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The train and test indices :func:`subsample` keeps (None: the whole split)."""
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return _stratified_take(ds.y_train, train_samples, rng_train), _stratified_take(ds.y_test, test_samples, rng_test)


def server_root(ds: ImageDataset, train_samples: int | None, root_samples: int, seed: int) -> tuple[Any, np.ndarray]:
    """The server's root set (FLTrust): ``root_samples`` labelled training images, class-proportional and
    seeded, from the part of the train split that :func:`subsample` leaves out, so that no client holds
    any of them. ``ds`` is the data set before :func:`subsample`. Returns (images, labels)."""
    tr, _ = _subsample_index(ds, train_samples, None, seed)
    rest = np.setdiff1d(np.arange(len(ds.y_train)), tr) if tr is not None else np.zeros(0, np.int64)
    if root_samples > len(rest):
        raise DataError(
            f"root_samples={root_samples} needs that many training images outside the clients' data, but the train split "
            f"holds {len(ds.y_train)} and train_samples={train_samples or 0} leaves {len(rest)}: lower root_samples or "
            f"set train_samples to at most {len(ds.y_train) - root_samples}")
    pick = _stratified_take(ds.y_train[rest], root_samples, np.random.default_rng([seed, 0xF17]))
    idx = rest if pick is None else rest[pick]
    return take(ds.x_train, idx), np.asarray(ds.y_train[idx])


def subsample(
    ds: ImageDataset, train_samples: int | None, test_samples: int | None, seed: int
) -> ImageDataset:
    """Seeded, class-proportional subset of train and/or test (for quick runs).

    ``None``, 0 or a count >= the split size keeps that split whole.  Original order
    is kept among the chosen samples.
    """
    tr, te = _subsample_index(ds, train_samples, test_samples, seed)
    return ImageDataset(
        ds.name,
        ds.x_train if tr is None else take(ds.x_train, tr),
        ds.y_train if tr is None else ds.y_train[tr],
        ds.x_test if te is None else take(ds.x_test, te),
        ds.y_test if te is None else ds.y_test[te],
        list(ds.classes),
    )

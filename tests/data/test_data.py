"""Tests for deltamask.data: loaders by spec, subsample, partition, preprocess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deltamask.data import sources as D
from deltamask.data import DataError, ImageDataset, load_dataset, partition, preprocess, subsample

FMNIST_DIR = Path(D.FASHION_MNIST_SYSTEM_DIR)


def _check_layout(ds: ImageDataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < ds.num_classes
    assert len(ds.x_test) > 0
    assert ds.num_classes == len(ds.classes)


# ---------------------------------------------------------------------- digits


def test_digits_shapes_and_deterministic_split() -> None:
    a = load_dataset("digits", seed=3, test_fraction=0.25)
    _check_layout(a)
    assert a.x_train.shape[1:] == (8, 8, 3)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert abs(len(a.x_test) - 0.25 * 1797) <= 10
    assert a.x_train.max() == 255 and a.classes == [str(i) for i in range(10)]
    # grayscale expanded: all channels equal
    assert np.array_equal(a.x_train[..., 0], a.x_train[..., 2])
    # stratified: every class present in test
    assert set(np.unique(a.y_test)) == set(range(10))
    b = load_dataset("digits", seed=3, test_fraction=0.25)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    c = load_dataset("digits", seed=4, test_fraction=0.25)
    assert not np.array_equal(a.y_test, c.y_test) or not np.array_equal(a.x_test, c.x_test)


def test_bad_test_fraction() -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


# --------------------------------------------------------------- fashion-mnist


@pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loads() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 3)
    assert ds.x_test.shape == (10000, 28, 28, 3)
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg and D.FASHION_MNIST_ENV in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_fashion_mnist_from_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny hand-written IDX files found through the env var (uncompressed + gz mixed)."""
    import gzip
    import struct

    rng = np.random.default_rng(0)

    def write(name: str, arr: np.ndarray, magic: int, gz: bool) -> None:
        payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
        if gz:
            with gzip.open(tmp_path / f"{name}.gz", "wb") as fh:
                fh.write(payload)
        else:
            (tmp_path / name).write_bytes(payload)

    write("train-images-idx3-ubyte", rng.integers(0, 256, (12, 5, 5), dtype=np.uint8), 0x803, True)
    write("train-labels-idx1-ubyte", np.arange(12, dtype=np.uint8) % 10, 0x801, False)
    write("t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), 0x803, True)
    write("t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8), 0x801, True)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    ds = load_dataset("fashion-mnist")
    _check_layout(ds)
    assert ds.x_train.shape == (12, 5, 5, 3) and ds.y_test.tolist() == [0, 1, 2, 3]

    # a corrupt (truncated) file is reported clearly
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 99) + b"\x00")
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("fashion-mnist")


# ------------------------------------------------------------------------- npz


def test_npz_gray_without_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 6, 7), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", seed=1, test_fraction=0.2)
    _check_layout(ds)
    assert ds.x_train.shape[1:] == (6, 7, 3) and len(ds.x_test) == 10
    assert np.bincount(ds.y_test).tolist() == [2] * 5
    assert ds.classes == ["0", "1", "2", "3", "4"]
    again = load_dataset(f"npz:{tmp_path / 'd.npz'}", seed=1, test_fraction=0.2)
    assert np.array_equal(ds.x_test, again.x_test)
    # images are the originals, channel-replicated
    for img in ds.x_test:
        assert any(np.array_equal(img[..., 0], orig) for orig in x)


def test_npz_rgb_with_test_and_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2, 0, 1]),
        x_test=xt, y_test=np.array([2, 1, 0]), classes=np.array(["cat", "dog", "eel"]),
    )
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    _check_layout(ds)
    assert np.array_equal(ds.x_train, x) and np.array_equal(ds.x_test, xt)
    assert ds.y_test.tolist() == [2, 1, 0] and ds.classes == ["cat", "dog", "eel"]


def test_npz_string_labels_and_int_conversion(tmp_path: Path) -> None:
    x = np.full((6, 3, 3, 1), 200, dtype=np.int32)  # integer, in range -> cast to uint8
    y = np.array(["b", "a", "b", "a", "b", "a"])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    _check_layout(ds)
    assert ds.classes == ["a", "b"] and ds.x_train.max() == 200


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"y": np.zeros(4, int)}, "no array 'x'"),
        ({"x": np.zeros((4, 3, 3), np.uint8)}, "no array 'y'"),
        ({"x": np.zeros((4, 3), np.uint8), "y": np.zeros(4, int)}, "must be"),
        ({"x": np.zeros((4, 3, 3, 5), np.uint8), "y": np.zeros(4, int)}, "channels"),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros(5, int)}, "4 images .* 5 labels"),
        ({"x": np.zeros((4, 3, 3), np.float32), "y": np.zeros(4, int)}, "must be uint8"),
        ({"x": np.full((4, 3, 3), 300, np.int64), "y": np.zeros(4, int)}, "must be uint8"),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros((4, 2), int)}, "1-D labels"),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.array([0, 1, -1, 0])}, ">= 0"),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros(4, np.float64)}, "integers"),
        (
            {"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros(4, int), "x_test": np.zeros((2, 3, 3), np.uint8)},
            "both 'x_test' and 'y_test'",
        ),
        (
            {"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros(4, int),
             "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.zeros(2, int)},
            "same size",
        ),
        (
            {"x": np.zeros((4, 3, 3), np.uint8), "y": np.zeros(4, int),
             "x_test": np.zeros((2, 3, 3), np.uint8), "y_test": np.zeros(3, int)},
            "x_test",
        ),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.array([0, 1, 2, 0]), "classes": np.array(["a"])}, "classes"),
    ],
)
def test_npz_bad_inputs(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_npz_array_size_limit_at_its_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: an npz array larger than the limit is refused from its header, before it is loaded."""
    import deltamask.data.sources as src

    x = np.zeros((10, 4, 4), np.uint8)  # 160 bytes
    np.savez(tmp_path / "d.npz", x=x, y=(np.arange(10) % 2).astype(np.int8))  # + 10 bytes
    monkeypatch.setattr(src, "MAX_NPZ_ARRAY_BYTES", 170)
    assert len(load_dataset(f"npz:{tmp_path / 'd.npz'}", test_fraction=0.2).x_train) == 8
    monkeypatch.setattr(src, "MAX_NPZ_ARRAY_BYTES", 159)
    with pytest.raises(DataError, match=r"array 'x' declares shape \(10, 4, 4\) of uint8 = 160 bytes, over the limit of 159"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_npz_total_size_and_foreign_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    import deltamask.data.sources as src

    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10) % 2)  # 160 + 80 bytes
    monkeypatch.setattr(src, "MAX_NPZ_ARRAY_BYTES", 200)  # each fits, together they do not
    with pytest.raises(DataError, match=r"its arrays declare 240 bytes together, over the limit of 200"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    monkeypatch.setattr(src, "MAX_NPZ_ARRAY_BYTES", 240)  # at the limit: loads
    assert len(load_dataset(f"npz:{tmp_path / 'd.npz'}", test_fraction=0.2).x_train) == 8
    with zipfile.ZipFile(tmp_path / "d.npz", "a") as zf:
        zf.writestr("bomb.bin", b"\0" * 1000)  # np.load would return it as bytes, read whole
    with pytest.raises(DataError, match="holds 'bomb.bin', which is not a .npy array"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_npz_header_claiming_a_huge_array_is_refused_before_loading(tmp_path: Path) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**7, 1000, 1000)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue())  # a header, no data: np.load would try to allocate 10 TB
        zf.writestr("y.npy", b"")
    with pytest.raises(DataError, match=r"array 'x' declares shape \(10000000, 1000, 1000\) of uint8 = 10,000,000,000,000 bytes"):
        load_dataset(f"npz:{tmp_path / 'bomb.npz'}")


def test_npz_object_array_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([0, "a"], dtype=object))
    with pytest.raises(DataError, match="object arrays"):
        load_dataset(f"npz:{tmp_path / 'o.npz'}")


# ---------------------------------------------------------------------- folder


def _write_png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, fill).save(path)


def test_folder_happy_path(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(5):
        _write_png(root / "zebra" / f"{i}.png", (10, 8), 10 * i)
        _write_png(root / "ant" / f"{i}.png", (10, 8), 100 + i, mode="L")
    _write_png(root / "ant" / "odd.png", (20, 20), 50)  # different size -> resized
    (root / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{root}", seed=0, test_fraction=0.3)
    _check_layout(ds)
    assert ds.classes == ["ant", "zebra"]
    assert ds.x_train.shape[1:] == (8, 10, 3)  # most common size (w=10, h=8)
    assert len(ds.x_train) + len(ds.x_test) == 11
    # grayscale 'ant' images were expanded to equal RGB channels
    ants = np.concatenate([ds.x_train[ds.y_train == 0], ds.x_test[ds.y_test == 0]])
    assert any(np.array_equal(a[..., 0], a[..., 1]) for a in ants)
    again = load_dataset(f"folder:{root}", seed=0, test_fraction=0.3)
    assert np.array_equal(ds.x_test, again.x_test)


def test_folder_train_test_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _write_png(root / split / c / f"{i}.jpg", (6, 6), 40 * i)
    ds = load_dataset(f"folder:{root}")
    _check_layout(ds)
    assert len(ds.x_train) == 6 and len(ds.x_test) == 4
    assert ds.y_test.tolist() == [0, 0, 1, 1]


def test_folder_train_only(tmp_path: Path) -> None:
    root = tmp_path / "tr"
    for c in ("a", "b"):
        for i in range(5):
            _write_png(root / "train" / c / f"{i}.png", (4, 4), i)
    ds = load_dataset(f"folder:{root}", test_fraction=0.2)
    assert ds.classes == ["a", "b"] and len(ds.x_test) == 2


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    bad = tmp_path / "bad" / "cls" / "x.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of 1 image files cannot be used .*x.png: cannot be read: UnidentifiedImageError"):
        load_dataset(f"folder:{tmp_path / 'bad'}")


def _png_bomb(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a few dozen bytes on disk): what a decompression bomb shows PIL."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("stream", [False, True])
def test_folder_skips_and_records_unreadable_files_and_bombs(tmp_path: Path, stream: bool) -> None:
    """Issue 22: one bad file no longer aborts a folder: run; it is skipped and named in ``skipped``."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(4):
            _write_png(root / c / f"{i}.png", (8, 8), 30 * i)
    (root / "a" / "junk.png").write_bytes(b"not a png")
    _png_bomb(root / "b" / "bomb.png", 100_000, 100_000)
    ds = load_dataset(f"folder:{root}", seed=0, test_fraction=0.25, stream=stream)
    assert len(ds.x_train) + len(ds.x_test) == 8
    assert sorted(Path(s.split(": ")[0]).name for s in ds.skipped) == ["bomb.png", "junk.png"]
    bomb = next(s for s in ds.skipped if "bomb.png" in s)
    assert "decompression bomb" in bomb
    assert np.asarray(ds.x_train).shape[1:] == (8, 8, 3)


def test_folder_pixel_limit_at_its_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deltamask.data.sources as src

    monkeypatch.setattr(src, "MAX_IMAGE_PIXELS", 80)
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(3):
            _write_png(root / c / f"{i}.png", (10, 8), 30 * i)  # 80 pixels: at the limit, kept
    _write_png(root / "a" / "big.png", (9, 9), 1)  # 81 pixels: one past it
    ds = load_dataset(f"folder:{root}", seed=0, test_fraction=0.34)
    assert len(ds.x_train) + len(ds.x_test) == 6
    assert len(ds.skipped) == 1 and "big.png: 9x9 pixels, over the limit of 80" in ds.skipped[0]


def test_folder_fails_when_too_few_images_remain(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(2):
        _write_png(root / "a" / f"{i}.png", (4, 4), i)
        _write_png(root / "b" / f"{i}.png", (4, 4), i)
        (root / "b" / f"bad{i}.png").write_bytes(b"x")
    ds = load_dataset(f"folder:{root}", test_fraction=0.5)  # 2 of 6 bad: fine
    assert len(ds.skipped) == 2
    for i in range(2, 4):
        (root / "b" / f"bad{i}.png").write_bytes(b"x")  # 4 of 8 bad: exactly half, still fine
    assert len(load_dataset(f"folder:{root}", test_fraction=0.5).skipped) == 4
    (root / "a" / "bad9.png").write_bytes(b"x")  # 5 of 9: more than half
    with pytest.raises(DataError, match=r"5 of 9 image files cannot be used \(more than 50%\)"):
        load_dataset(f"folder:{root}", test_fraction=0.5)


def test_folder_a_class_left_empty_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(6):
        _write_png(root / "a" / f"{i}.png", (4, 4), i)
    (root / "b").mkdir()
    (root / "b" / "only.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no usable image left in class 'b'"):
        load_dataset(f"folder:{root}", test_fraction=0.5)


# -------------------------------------------------------------------------- hf


def _hf_dataset(n: int, seed: int):  # type: ignore[no-untyped-def]
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8), mode="L") for _ in range(n)]
    features = datasets.Features(
        {"img": datasets.Image(), "text": datasets.Value("string"),
         "target": datasets.ClassLabel(names=["neg", "pos", "mid"])}
    )
    return datasets.Dataset.from_dict(
        {"img": images, "text": ["t"] * n, "target": [i % 3 for i in range(n)]}, features=features
    )


def test_hf_load_from_disk_single(tmp_path: Path) -> None:
    _hf_dataset(15, 0).save_to_disk(str(tmp_path / "single"))
    ds = load_dataset(f"hf:{tmp_path / 'single'}", seed=2, test_fraction=0.2)
    _check_layout(ds)
    assert ds.classes == ["neg", "pos", "mid"]
    assert ds.x_train.shape[1:] == (5, 5, 3) and len(ds.x_test) == 3
    again = load_dataset(f"hf:{tmp_path / 'single'}", seed=2, test_fraction=0.2)
    assert np.array_equal(ds.x_test, again.x_test)


def test_hf_load_from_disk_dict_and_splits(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"train": _hf_dataset(9, 0), "validation": _hf_dataset(4, 1), "extra": _hf_dataset(3, 2)})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = load_dataset(f"hf:{tmp_path / 'dd'}")
    assert len(ds.x_train) == 9 and len(ds.x_test) == 4  # validation used as test
    ds2 = load_dataset(f"hf:{tmp_path / 'dd'}:train:extra")
    assert len(ds2.x_test) == 3
    with pytest.raises(DataError, match="no split 'nope'"):
        load_dataset(f"hf:{tmp_path / 'dd'}:nope")


def test_hf_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("Couldn't reach 'someone/thing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="unreachable") as err:
        load_dataset("hf:someone/thing")
    assert "save_to_disk" in str(err.value)


def test_hf_no_image_column(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"a": [1, 2], "label": [0, 1]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError, match="Image feature"):
        load_dataset(f"hf:{tmp_path / 'noimg'}")


# ---------------------------------------------------------------- unknown spec


@pytest.mark.parametrize("spec", ["mnist", "npz:", "csv:foo", ""])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert "valid forms" in msg and "npz:PATH" in msg and "folder:PATH" in msg and "hf:NAME" in msg


# ------------------------------------------------------------------- subsample


def _toy(n_per_class: list[int], n_test: int = 30) -> ImageDataset:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    x = np.zeros((len(y), 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y)) % 256
    yt = np.arange(n_test) % len(n_per_class)
    return ImageDataset("toy", x, y, np.zeros((n_test, 2, 2, 3), np.uint8), yt, [str(i) for i in range(len(n_per_class))])


def test_subsample_stratified_and_seeded() -> None:
    ds = _toy([500, 300, 200])
    s = subsample(ds, 100, 9, seed=1)
    assert np.bincount(s.y_train).tolist() == [50, 30, 20]
    assert np.bincount(s.y_test).tolist() == [3, 3, 3]
    s2 = subsample(ds, 100, 9, seed=1)
    assert np.array_equal(s.x_train, s2.x_train)
    s3 = subsample(ds, 100, 9, seed=2)
    assert not np.array_equal(s.x_train, s3.x_train)
    odd = subsample(ds, 7, None, seed=0)  # largest remainder: 3.5, 2.1, 1.4 -> 4, 2, 1
    assert len(odd.y_train) == 7 and np.bincount(odd.y_train).tolist() == [4, 2, 1]
    for keep in (None, 0, 1000, 5000):
        k = subsample(ds, keep, keep, seed=0)
        assert len(k.y_train) == 1000 and len(k.y_test) == 30
    with pytest.raises(DataError):
        subsample(ds, -1, None, seed=0)


# ------------------------------------------------------------------- partition


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert len(flat) == n
    assert np.array_equal(np.sort(flat), np.arange(n))  # disjoint and covering
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


LABELS = np.repeat(np.arange(10), 100)  # sorted labels: stresses IID shuffling


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_partition_iid(seed: int) -> None:
    parts = partition(LABELS, 7, "iid", seed=seed)
    _assert_partition(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # each client sees roughly the global label mix (not contiguous label blocks)
    for p in parts:
        assert len(np.unique(LABELS[p])) == 10


@pytest.mark.parametrize("seed", [0, 1, 7, 42])
def test_partition_dirichlet_is_partition(seed: int) -> None:
    parts = partition(LABELS, 10, "dirichlet", alpha=0.3, seed=seed, min_partition_size=5)
    _assert_partition(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5


def test_partition_dirichlet_non_iid_and_deterministic() -> None:
    def skew(parts: list[np.ndarray]) -> float:
        # mean total-variation distance between client label mix and the global mix
        glob = np.bincount(LABELS, minlength=10) / len(LABELS)
        return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum() for p in parts]))

    small = partition(LABELS, 10, "dirichlet", alpha=0.1, seed=3)
    iid = partition(LABELS, 10, "iid", seed=3)
    large = partition(LABELS, 10, "dirichlet", alpha=1000.0, seed=3)
    assert skew(small) > 0.4
    assert skew(iid) < 0.2 and skew(large) < 0.2  # sampling noise at 100 per client ~0.12
    again = partition(LABELS, 10, "dirichlet", alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(small, again))
    other = partition(LABELS, 10, "dirichlet", alpha=0.1, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(small, other))
    assert all(np.array_equal(a, b) for a, b in zip(iid, partition(LABELS, 10, "iid", seed=3)))


def test_partition_errors() -> None:
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition(LABELS, 3, "shards")
    with pytest.raises(DataError, match="fewer clients"):
        partition(np.arange(5), 6)
    with pytest.raises(DataError, match="min_partition_size"):
        partition(LABELS, 10, "iid", min_partition_size=101)
    with pytest.raises(DataError, match="alpha"):
        partition(LABELS, 10, "dirichlet", alpha=0.0)
    # 2 clients, 2 samples, 1 label: Dirichlet(1e-3) all but surely puts both samples
    # on one client, so min_partition_size=1 can never be met in 10 tries.
    with pytest.raises(DataError, match="Raise alpha"):
        partition(np.zeros(2, np.int64), 2, "dirichlet", alpha=1e-3, seed=0, min_partition_size=1)


# ------------------------------------------------------------------ preprocess


def test_preprocess_shapes_and_normalization() -> None:
    x = np.zeros((5, 8, 6, 3), np.uint8)
    x[..., 0] = 255
    x[..., 1] = 51
    mean, std = (0.5, 0.1, 0.0), (0.5, 0.1, 1.0)
    out = preprocess(x, 16, mean, std, batch=2)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.ones(1), atol=1e-5)  # (1-0.5)/0.5
    assert torch.allclose(out[:, 1], torch.ones(1), atol=1e-5)  # (51/255-0.1)/0.1
    assert torch.allclose(out[:, 2], torch.zeros(1), atol=1e-6)


def test_preprocess_matches_unbatched_and_deterministic() -> None:
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 3), dtype=np.uint8)
    a = preprocess(x, 12, (0.0,) * 3, (1.0,) * 3, batch=3)
    b = preprocess(x, 12, (0.0,) * 3, (1.0,) * 3, batch=100)
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    same = preprocess(x, 28, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(same, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(DataError):
        preprocess(x.astype(np.float32), 12, (0.0,) * 3, (1.0,) * 3)

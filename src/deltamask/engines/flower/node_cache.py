"""A per-node disk cache of a client's round-invariant data, for Flower deployments.

In a deployment every message starts a fresh ``flwr-clientapp`` process, so an in-memory cache never
hits: each round would reload the data set, subsample and partition it and run the client's images
through the mask-independent prefix again. :func:`client_experiment_cached` stores what does not
change between rounds once per node and reuses it:

``cache_dir/<key>/tensors.safetensors``  the client's prefix outputs ``h`` and labels ``y`` (CPU)
``cache_dir/<key>/manifest.json``        key and what it was made of, client sizes, classes,
                                         dtype / shape / sha256 of every array
``cache_dir/events.log``                 one JSON line per call: ``hit`` or ``build`` (+ reason)

``<key>`` (:func:`cache_key`) hashes every config key that can change those arrays (the fields whose
``effect`` is ``data``; every field must declare its effect, so a new key is never left out by omission), the partition id, the resolved device kind, fingerprints of local weight / data files
(path + size + mtime) and the versions of deltamask and of the libraries that compute the arrays.
A load is verified (manifest, sizes, checksums) and anything that does not match is rebuilt with a
warning. Entries are written to a temporary directory and moved into place with ``os.replace``, so
processes racing on one node never see a half-written entry. Only safetensors and JSON are read:
nothing is unpickled. The model itself is still built in the process (``load_model``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from ... import __version__
from ...config import CACHE_IGNORED, Config
from ...run.experiment import Experiment, build_experiment, client_experiment_from_arrays, resolve_device
from ...methods import ClientData
from ...model.prefix_cache import stored_tensor

log = logging.getLogger("deltamask")

#: bump when the layout or the meaning of an entry changes (2: the key's config part is every key whose
#: ``effect`` is ``data``; entries made under 1 are rebuilt once)
FORMAT = 2
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
EVENTS = "events.log"
#: environment variable a deployment may set to choose the cache directory (see :func:`default_cache_dir`)
CACHE_ENV = "DELTAMASK_NODE_CACHE"

#: config keys that cannot change a client's prefix outputs, labels or split (every key whose ``effect`` is
#: not ``data``, :data:`deltamask.config.CACHE_IGNORED`). Every other key is part of the cache key
#: (``device`` enters resolved, as the device kind, see :func:`key_material`).
IGNORED_KEYS: frozenset[str] = CACHE_IGNORED
#: libraries whose version can change the arrays (model code, preprocessing, sampling, partitioning)
_LIBRARIES = ("torch", "timm", "numpy", "flwr-datasets", "datasets", "scikit-learn", "transformers", "torchvision")

#: this process's hits and builds (the events log counts across processes)
STATS: dict[str, int] = {"hits": 0, "builds": 0}


class CacheMismatch(Exception):
    """A stored entry is unreadable, corrupted or was made for something else."""


# --- the key --------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _stat(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        return [str(path), "missing"]
    return [str(path), st.st_size, st.st_mtime_ns]


def _tree_stat(root: Path, recursive: bool = True) -> Any:
    """A file's (path, size, mtime); for a directory, a hash of those of every file under it."""
    if not root.is_dir():
        return _stat(root)
    h = hashlib.sha256(str(root).encode())
    walker = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir() if p.is_file()])]
    for dirpath, dirnames, filenames in walker:
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(json.dumps([str(p.relative_to(root)), *_stat(p)[1:]]).encode())
    return h.hexdigest()


def _weights_fingerprint(cfg: Config) -> Any:
    from ...model.backbones import RANDOM_WEIGHTS, family_of

    if cfg.weights == RANDOM_WEIGHTS:
        return "random"
    if cfg.weights:
        return _tree_stat(Path(cfg.weights).expanduser().resolve(), recursive=False)
    try:
        family, arg = family_of(cfg.model)
        local = family.local_weights(arg) if family.local_weights else None
    except Exception:  # noqa: BLE001 - unknown spec or package missing: load_model will say so
        return "missing"
    if local is None:
        return "pretrained"  # a hub download, identified by the spec and the library versions
    return _tree_stat(local, recursive=False) if local.is_dir() else _stat(local)


def _data_fingerprint(cfg: Config) -> Any:
    from ...data import sources as data_mod

    kind, sep, arg = cfg.dataset.strip().partition(":")
    kind = kind.lower()
    if not sep and kind in ("fashion-mnist", "fashion_mnist", "fmnist"):
        dirs = []
        if cfg.data_dir:
            dirs += [Path(cfg.data_dir), Path(cfg.data_dir) / "fashion-mnist"]
        if os.environ.get(data_mod.FASHION_MNIST_ENV):
            dirs.append(Path(os.environ[data_mod.FASHION_MNIST_ENV]))
        dirs.append(Path(data_mod.FASHION_MNIST_SYSTEM_DIR))
        for d in dirs:  # the directory load_dataset will read
            files = [data_mod._find_idx_file(d, stem) for stem in data_mod.FASHION_MNIST_FILES.values()]
            if all(files):
                return [_stat(f.resolve()) for f in files if f is not None]
        return "missing"
    if sep and kind in ("npz", "folder"):
        return _tree_stat(Path(arg).expanduser().resolve())
    return "builtin"  # digits (scikit-learn's copy), hf:NAME (by name and library versions)


def key_material(cfg: Config, pid: int) -> dict[str, Any]:
    """Everything the cached arrays of client ``pid`` depend on (hashed by :func:`cache_key`)."""
    device = resolve_device(cfg.device)
    dev: list[Any] = [device.type]
    if device.type == "cuda":
        dev.append(torch.cuda.get_device_name(device))
    return {
        "format": FORMAT,
        "config": {k: v for k, v in sorted(cfg.to_dict().items()) if k not in IGNORED_KEYS},
        "partition_id": int(pid),
        "device": dev,
        "weights": _weights_fingerprint(cfg),
        "data": _data_fingerprint(cfg),
        "deltamask": __version__,
        "libraries": {d: _version(d) for d in _LIBRARIES},
    }


def _digest(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def cache_key(cfg: Config, pid: int) -> str:
    """The directory name, under the cache directory, of client ``pid``'s entry for ``cfg``."""
    return _digest(key_material(cfg, pid))


def default_cache_dir() -> Path:
    """``$DELTAMASK_NODE_CACHE``, else ``$XDG_CACHE_HOME/deltamask/node`` (``~/.cache/deltamask/node``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deltamask" / "node"


# --- reading and writing entries --------------------------------------------------------------------

def _sha256(t: torch.Tensor) -> str:
    """sha256 of the array's bytes (as stored: C order, native little-endian)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _read_entry(entry: Path, key: str, material: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The verified manifest and arrays of ``entry``; FileNotFoundError if absent, CacheMismatch if bad.

    Both files are opened through one directory descriptor, so a concurrent ``os.replace`` of the
    entry cannot pair a manifest with another entry's arrays."""
    from safetensors.torch import load as st_load

    dfd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)  # FileNotFoundError: no entry yet
    try:
        def read(name: str) -> bytes:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            except FileNotFoundError:
                raise CacheMismatch(f"{name} is missing") from None
            with os.fdopen(fd, "rb") as f:
                return f.read()

        raw_manifest = read(MANIFEST)
        blob = read(TENSORS)
    finally:
        os.close(dfd)
    try:
        man = json.loads(raw_manifest)
    except ValueError as e:
        raise CacheMismatch(f"manifest is not JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("key") != key or man.get("material") != material:
        raise CacheMismatch("manifest was written for another key or format")
    try:
        arrays = st_load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is corruption
        raise CacheMismatch(f"{TENSORS} is not readable ({e})") from None
    specs = man.get("tensors", {})
    if set(arrays) != {"h", "y"} or set(specs) != {"h", "y"}:
        raise CacheMismatch(f"{TENSORS} holds {sorted(arrays)}, expected h and y")
    for name, t in arrays.items():
        spec = specs[name]
        if _dtype(t) != spec.get("dtype") or list(t.shape) != spec.get("shape"):
            raise CacheMismatch(f"array {name!r} is {_dtype(t)} {list(t.shape)}, the manifest says {spec.get('dtype')} {spec.get('shape')}")
        if _sha256(t) != spec.get("sha256"):
            raise CacheMismatch(f"array {name!r} does not match its sha256 checksum")
    sizes = man.get("client_sizes")
    if not isinstance(sizes, list) or len(sizes) != int(material["config"]["num_clients"]):
        raise CacheMismatch(f"client_sizes {sizes} does not list num_clients clients")
    return man, arrays  # sizes[pid] against the arrays: client_experiment_from_arrays checks


def _write_entry(cache_dir: Path, key: str, material: dict[str, Any], pid: int, exp: Experiment, data: ClientData) -> None:
    """Write the entry to a temporary directory, then move it into place atomically."""
    from safetensors.torch import save as st_save

    arrays = {"h": stored_tensor(data.h).detach().to("cpu").contiguous(), "y": data.y.detach().to("cpu", torch.int64).contiguous()}
    blob = st_save(arrays)
    manifest = {
        "format": FORMAT,
        "key": key,
        "material": material,
        "partition_id": pid,
        "created": time.time(),
        "client_sizes": [int(s) for s in exp.client_sizes],
        "dataset_name": exp.dataset.name,
        "classes": list(exp.dataset.classes),
        "image_size": int(exp.image_size),
        "first_masked_stage": int(exp.net.first_masked_stage),
        "num_masked": int(exp.net.num_masked),
        "tensors": {
            name: {"dtype": _dtype(t), "shape": list(t.shape), "sha256": _sha256(t)}
            for name, t in arrays.items()
        },
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep(cache_dir)
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, payload in ((TENSORS, blob), (MANIFEST, json.dumps(manifest, indent=1).encode())):
            with open(tmp / name, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        _install(tmp, cache_dir / key, key, material)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, final: Path, key: str, material: dict[str, Any]) -> None:
    """``os.replace(tmp, final)``; a valid entry already there (another process won) is kept, a bad one
    is moved aside first."""
    for _ in range(5):
        try:
            os.replace(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            _read_entry(final, key, material)
            return  # someone else installed a good entry meanwhile
        except (FileNotFoundError, CacheMismatch):
            pass
        _discard(final)
    raise OSError(f"could not install cache entry {final}")


def _discard(entry: Path) -> None:
    """Move ``entry`` aside (atomically: readers holding it keep a consistent view) and delete it."""
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(entry, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(cache_dir: Path, older_than: float = 3600.0) -> None:
    """Remove temporary / trash directories left by processes that died mid-write."""
    now = time.time()
    for p in cache_dir.glob(".t*-*"):
        try:
            if p.name.startswith((".tmp-", ".trash-")) and now - p.stat().st_mtime > older_than:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --- counting ---------------------------------------------------------------------------------------

def _record(cache_dir: Path, event: str, key: str, pid: int, seconds: float, reason: str = "") -> None:
    STATS["hits" if event == "hit" else "builds"] += 1
    line = {"time": time.time(), "event": event, "key": key, "partition_id": pid, "process": os.getpid(), "seconds": round(seconds, 4)}
    if reason:
        line["reason"] = reason
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("node cache: could not append to %s: %s", cache_dir / EVENTS, e)


def cache_events(cache_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every ``hit`` / ``build`` recorded under ``cache_dir``, oldest first."""
    p = Path(cache_dir) / EVENTS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def cache_counts(cache_dir: str | os.PathLike[str], key: str | None = None) -> dict[str, int]:
    """``{"hit": H, "build": B}`` over all processes, for one key or all."""
    counts = {"hit": 0, "build": 0}
    for e in cache_events(cache_dir):
        if key is None or e.get("key") == key:
            counts[e["event"]] = counts.get(e["event"], 0) + 1
    return counts


# --- the entry point --------------------------------------------------------------------------------

def client_experiment_cached(
    cfg: Config, pid: int, cache_dir: str | os.PathLike[str], status: Callable[[str], None] | None = None
) -> tuple[Experiment, ClientData, bool]:
    """Client ``pid``'s Experiment and data, from ``cache_dir`` when a valid entry exists (third value
    True), else built with ``build_experiment(cfg, clients=[pid], test=False)`` and stored (False).

    ``data`` equals ``build_experiment(cfg, clients=[pid]).client_data(pid)`` exactly. On a hit the
    model is built afresh (same seed) but the data set is not loaded: ``exp.dataset`` has the classes
    and no images, and ``exp.test_h`` / ``exp.test_y`` are empty. A cache that cannot be written only
    costs the speed-up (a warning), never the round."""
    t0 = time.perf_counter()
    root = Path(cache_dir)
    material = key_material(cfg, pid)
    key = _digest(material)
    entry = root / key
    reason = "absent"
    try:
        man, arrays = _read_entry(entry, key, material)
        exp = client_experiment_from_arrays(
            cfg, pid, arrays["h"], arrays["y"], man["client_sizes"], man["dataset_name"], man["classes"], status
        )
        if (exp.net.first_masked_stage, exp.net.num_masked, exp.image_size) != (man["first_masked_stage"], man["num_masked"], man["image_size"]):
            raise CacheMismatch("the model built now does not match the one the entry was made with")
    except FileNotFoundError:
        pass  # no entry yet
    except (CacheMismatch, OSError, KeyError, TypeError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
        log.warning("node cache: entry %s for client %d is unusable (%s); rebuilding", entry, pid, reason)
        try:
            _discard(entry)  # so that the rebuilt entry replaces it (a valid entry found at install is kept)
        except OSError:
            pass
    else:
        data = exp.client_data(pid)
        _record(root, "hit", key, pid, time.perf_counter() - t0)
        log.info("node cache: hit %s (client %d)", key, pid)
        return exp, data, True
    exp = build_experiment(cfg, status, clients=[pid], test=False)
    data = exp.client_data(pid)
    try:
        _write_entry(root, key, material, pid, exp, data)
    except OSError as e:
        log.warning("node cache: could not store %s: %s", entry, e)
    _record(root, "build", key, pid, time.perf_counter() - t0, reason)
    log.info("node cache: built %s (client %d; %s)", key, pid, reason)
    return exp, data, False

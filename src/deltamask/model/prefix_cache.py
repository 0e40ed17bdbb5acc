"""Where the cached prefix outputs live, and in what dtype: memory that does not grow without bound.

Every image goes once through the mask-independent prefix of the backbone; the outputs are reused by
every round. Kept as float32 on the device they cost ``n * tokens * dim * 4`` bytes (ViT-B/16 at 224 px:
~600 KB per image, ~30 GB for 50k images). Three config keys bound that:

``cache_dtype``    storage dtype (float32, float16, bfloat16). Compute stays float32: rows are cast when
                   a batch is read, so float16 / bfloat16 halve the bytes and change accuracy only by the
                   rounding of the stored activations.
``cache_ram_mb``   RAM budget of the prefix cache (0 = no limit). The estimate counts the train and test
                   stores and, for an in-RAM store, the clients' copies of their rows
                   (:meth:`Experiment.client_data` gathers them once per client), so 2x train + test.
``prefix_cache``   ``auto`` (in RAM if the estimate fits the budget, else on disk), ``ram`` (refused
                   above the budget), ``disk`` (always on disk).

The disk store is one flat file per split under ``cache_dir`` (a temp dir by default), written chunk by
chunk as the prefix is computed, and read back a batch at a time with ``os.pread`` (runs of
consecutive rows in one call). It is deliberately not ``mmap``-ed: pages of a mapping count in the
process's resident set (RssFile) as they are touched, so a shuffled epoch over a mapped file would grow
RSS up to the file's size; ``pread`` leaves the caching to the kernel's page cache, which gives it back
under pressure. Clients then hold :class:`DiskRows` views (row indices), never copies. The file is
deleted when the store is garbage collected (and at interpreter exit).

Every decision is made by :func:`plan_cache` *before* anything is computed or written; a cache that
cannot fit raises :class:`ConfigError` naming the key that fixes it (the CLI exits 2).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..config import Config, ConfigError

#: storage dtypes by config name
CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: free space the disk store leaves on its file system (bytes): a full disk breaks more than this run
DISK_RESERVE = 256 << 20


@dataclass(frozen=True)
class CachePlan:
    """Where (``ram`` / ``disk``) and how (``dtype``) the prefix outputs of one experiment are stored."""

    where: str
    dtype: torch.dtype
    train_bytes: int
    test_bytes: int
    directory: Path | None  # the disk store's directory (None for ram)

    @property
    def ram_estimate(self) -> int:
        """Bytes of prefix outputs an in-RAM store keeps resident (2x train: store + clients' copies)."""
        return 2 * self.train_bytes + self.test_bytes


def _mb(b: int) -> str:
    return f"{b / 2**20:,.1f} MB"


def plan_cache(cfg: Config, row_shape: tuple[int, ...], n_train: int, n_test: int) -> CachePlan:
    """Decide the store of ``n_train`` + ``n_test`` rows of ``row_shape`` under ``cfg``'s budget, or raise
    ConfigError naming the key to change. Nothing is written here."""
    dtype = CACHE_DTYPES[cfg.cache_dtype]
    row = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
    train_b, test_b = n_train * row, n_test * row
    budget = cfg.cache_ram_mb << 20
    ram = 2 * train_b + test_b
    where = cfg.prefix_cache
    if where == "auto":
        where = "ram" if not budget or ram <= budget else "disk"
    if where == "ram":
        if budget and ram > budget:
            raise ConfigError(
                f"config key 'prefix_cache': an in-RAM prefix cache needs {_mb(ram)} ({n_train} train x2 + {n_test} test rows "
                f"of {row:,} bytes, {cfg.cache_dtype}), over cache_ram_mb={cfg.cache_ram_mb}; set prefix_cache=auto or disk, "
                "raise cache_ram_mb, or use cache_dtype=float16"
            )
        return CachePlan("ram", dtype, train_b, test_b, None)
    directory = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(tempfile.gettempdir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise ConfigError(f"config key 'cache_dir': cannot use {str(directory)!r} for the disk prefix cache ({e}); set cache_dir to a writable directory") from None
    if train_b + test_b + DISK_RESERVE > free:
        raise ConfigError(
            f"config key 'cache_dir': the disk prefix cache needs {_mb(train_b + test_b)} but {str(directory)!r} has "
            f"{_mb(free)} free (keeping {_mb(DISK_RESERVE)} spare); set cache_dir to a larger disk, use cache_dtype=float16, "
            "or lower train_samples"
        )
    return CachePlan("disk", dtype, train_b, test_b, directory)


class DiskStore:
    """``n`` rows of ``row_shape`` in ``dtype``, in a flat file written front to back (:meth:`append`) and
    gathered by row index (:meth:`rows`) with ``os.pread``."""

    def __init__(self, directory: Path, n: int, row_shape: tuple[int, ...], dtype: torch.dtype, tag: str) -> None:
        self.n, self.row_shape, self.dtype = int(n), tuple(row_shape), dtype
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()
        self.path = Path(directory) / f"deltamask-prefix-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._finalizer = weakref.finalize(self, DiskStore._cleanup, self._fd, str(self.path))
        self.written = 0

    @staticmethod
    def _cleanup(fd: int, path: str) -> None:
        try:
            os.close(fd)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Close and delete the file now (it is also deleted when the store is garbage collected)."""
        self._finalizer()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.row_shape)

    def append(self, chunk: torch.Tensor) -> None:
        """Write the next ``len(chunk)`` rows (cast to the store's dtype)."""
        c = chunk.detach().to("cpu", self.dtype).contiguous()
        if self.written + c.shape[0] > self.n or tuple(c.shape[1:]) != self.row_shape:
            raise ValueError(f"chunk {tuple(c.shape)} does not fit the store {self.shape} at row {self.written}")
        data = c.view(torch.uint8).numpy().tobytes() if c.numel() else b""
        view, off = memoryview(data), self.written * self.row_bytes
        while view:
            k = os.pwrite(self._fd, view, off)
            view, off = view[k:], off + k
        self.written += c.shape[0]

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (any order, repeats allowed) as a CPU tensor in the store's dtype."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.written):
            raise IndexError(f"row index out of range 0..{self.written - 1}")
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        buf = np.empty((len(idx), self.row_bytes), np.uint8)
        if len(idx):
            cut = np.flatnonzero(np.diff(srt) != 1) + 1  # runs of consecutive rows: one read each
            for s, e in zip(np.r_[0, cut], np.r_[cut, len(srt)]):
                want = int(e - s) * self.row_bytes
                got = os.pread(self._fd, want, int(srt[s]) * self.row_bytes)
                if len(got) != want:
                    raise OSError(f"short read from the prefix cache {self.path}: {len(got)} of {want} bytes")
                buf[s:e] = np.frombuffer(got, np.uint8).reshape(int(e - s), self.row_bytes)
        out = np.empty_like(buf)
        out[order] = buf
        return torch.from_numpy(out).view(self.dtype).reshape(len(idx), *self.row_shape)


class DiskRows:
    """A client's (or the test set's) rows of a :class:`DiskStore`: indexing it like a tensor (an index
    tensor / array or a slice) reads those rows and returns them as float32, so the training and
    evaluation loops use it exactly as they use an in-RAM tensor of prefix outputs."""

    def __init__(self, store: DiskStore, rows: np.ndarray | None = None) -> None:
        self.store = store
        self.index = np.arange(store.n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.store.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what a read returns; the file holds store.dtype

    def __len__(self) -> int:
        return len(self.index)

    def select(self, rows: np.ndarray) -> "DiskRows":
        """A view of some of these rows (no read)."""
        return DiskRows(self.store, self.index[np.asarray(rows, dtype=np.int64)])

    def __getitem__(self, key: slice | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return self.store.rows(self.index[key]).to(torch.float32)

    def materialize(self) -> torch.Tensor:
        """All these rows, in the store's dtype, in RAM (for writing a node cache entry)."""
        return self.store.rows(self.index)


#: what ``ClientData.h`` / ``Experiment.train_h`` hold: an in-RAM tensor (storage dtype, on the device) or
#: disk rows. Both answer ``.shape``, ``h[index tensor]`` and ``h[a:b]``; readers cast batches to float32.
PrefixRows = Union[torch.Tensor, DiskRows]


def stored_tensor(h: PrefixRows) -> torch.Tensor:
    """The rows in their storage dtype as one tensor (a node cache entry stores this)."""
    return h.materialize() if isinstance(h, DiskRows) else h


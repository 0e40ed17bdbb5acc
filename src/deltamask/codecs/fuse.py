"""Binary fuse filters (Graf & Lemire 2022, "Binary Fuse Filters: Fast and Smaller Than Xor Filters").

A filter over a key set ``S`` stores one ``b``-bit fingerprint per slot of an array ``F`` so that for
every key ``x``: ``fp(x) == F[h_0(x)] ^ F[h_1(x)] ^ ... ^ F[h_{a-1}(x)]`` (``a`` = arity, 3 or 4). A
non-key passes with probability ``2^-b``; a key always passes (no false negatives).

Hashing and layout (identical to the reference C implementation FastFilter/xor_singleheader
``binary_fuse8_*`` / ``binary_fuse16_*`` for arity 3, so that either side answers membership for
the other's filter; see ``tests/codecs/test_codec_interop.py``)::

    h      = murmur64(key + seed)                        (mod 2^64; murmur64 = MurmurHash3 fmix64)
    fp     = (h ^ (h >> 32)) mod 2^b
    h_0    = (h * segment_count_length) >> 64            (high half of the 128-bit product)
    h_j    = (h_0 + j * segment_length) ^ ((h >> s_j) & (segment_length - 1))    j = 1..a-1
    3-wise: s_1 = 18, s_2 = 0                            (the C reference)
    4-wise: s_1 = 0,  s_2 = L, s_3 = 2L  with L = log2(segment_length)   (our own choice: disjoint bits)

    segment_count_length = segment_count * segment_length
    array_length         = (segment_count + arity - 1) * segment_length

Sizes follow the paper's (and the C code's) formulas: for 3-wise, ``segment_length =
2^floor(ln(n)/ln(3.33) + 2.25)`` and a capacity of ``n * max(1.125, 0.875 + 0.25 ln(1e6)/ln(n))``;
for 4-wise, ``2^floor(ln(n)/ln(2.91) - 0.5)`` and ``max(1.075, 0.77 + 0.305 ln(6e5)/ln(n))``;
segment length capped at 2^18, and halved (not below 256) while there would be fewer than 32
segments, as the C code does. When peeling fails (a 2-core in the hypergraph) we retry with the next
seed of a splitmix64 sequence started at the caller's seed; after 10 failures the segment count grows
by ~5% per attempt, and construction gives up with :class:`CodecError` after 64 attempts (never seen).

Construction (counting + peeling + back-substitution) runs in numba; the query is vectorized numpy,
a numba kernel (default when numba is installed: ~4x faster), or torch (CPU or GPU, bit-identical).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._jit import HAVE_NUMBA, njit, prange
from .base import IndexCodec, check_indices, register
from .container import MAX_DECODE_N, OVERHEAD_BYTES, CodecError, check_decode_size, pack, unpack

MASK64 = (1 << 64) - 1
_C1 = 0xFF51AFD7ED558CCD  # MurmurHash3 fmix64 multipliers
_C2 = 0xC4CEB9FE1A85EC53
_U_C1 = np.uint64(_C1)
_U_C2 = np.uint64(_C2)
_U32 = np.uint64(32)
_U33 = np.uint64(33)
_M32 = np.uint64(0xFFFFFFFF)
#: Largest segment length (the C reference's cap, keeps 3-wise offsets in the low 36 hash bits).
MAX_SEGMENT_LENGTH = 1 << 18
#: Segment-count floor and the length it may not shrink below (matches the C reference's sizes).
MIN_SEGMENTS = 32
MIN_SHRUNK_SEGMENT_LENGTH = 256
#: Retries at the nominal size before the array grows, and the overall bound on attempts.
NOMINAL_ATTEMPTS = 10
MAX_ATTEMPTS = 64
#: Filter parameter block: seed, segment_length, segment_count, array_length, arity, fp_bits, reserved.
PARAMS = struct.Struct("<QIIIBBH")


# --- scalar helpers (Python ints) --------------------------------------------------------------------

def murmur64(x: int) -> int:
    """MurmurHash3's 64-bit finalizer (a bijection of uint64)."""
    x &= MASK64
    x ^= x >> 33
    x = (x * _C1) & MASK64
    x ^= x >> 33
    x = (x * _C2) & MASK64
    x ^= x >> 33
    return x


def splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: returns (new state, output). Used to derive retry seeds."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


# --- layout ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseLayout:
    """Sizes of a binary fuse filter's fingerprint array."""

    arity: int
    segment_length: int
    segment_count: int

    @property
    def array_length(self) -> int:
        return (self.segment_count + self.arity - 1) * self.segment_length

    @property
    def segment_count_length(self) -> int:
        return self.segment_count * self.segment_length

    def shifts(self) -> tuple[int, ...]:
        """Right shifts of the hash that give the in-segment offsets of h_1..h_{a-1}."""
        if self.arity == 3:
            return (18, 0)
        lg = self.segment_length.bit_length() - 1
        return (0, lg, 2 * lg)


def fuse_layout(size: int, arity: int) -> FuseLayout:
    """The segment length and count for ``size`` keys (same integers as the C reference for 3-wise)."""
    if arity not in (3, 4):
        raise ValueError(f"arity must be 3 or 4, got {arity}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        e = 2
    elif arity == 3:
        e = int(math.floor(math.log(size) / math.log(3.33) + 2.25))
    else:
        e = max(2, int(math.floor(math.log(size) / math.log(2.91) - 0.5)))
    sl = min(1 << e, MAX_SEGMENT_LENGTH)
    if size <= 1:
        capacity = 0
    else:
        if arity == 3:
            factor = max(1.125, 0.875 + 0.25 * math.log(1e6) / math.log(size))
        else:
            factor = max(1.075, 0.77 + 0.305 * math.log(6e5) / math.log(size))
        capacity = int(math.floor(size * factor + 0.5))

    def count_for(sl: int) -> int:
        segments = -(-capacity // sl)
        return 1 if segments <= arity - 1 else segments - (arity - 1)

    # Mid-sized sets (~3e3..1.2e5 keys for 3-wise) get shorter segments: the reference C code keeps
    # at least 32 segments unless that would take the length below 256 (established by comparing
    # its allocations for every size up to 4e5, tests/codecs/test_codec_interop.py).
    while sl > MIN_SHRUNK_SEGMENT_LENGTH and count_for(sl) < MIN_SEGMENTS:
        sl //= 2
    return FuseLayout(arity, sl, count_for(sl))


# --- numpy hashing -------------------------------------------------------------------------------------

def _hash_np(keys: np.ndarray, seed: int) -> np.ndarray:
    h = keys.astype(np.uint64, copy=True)
    h += np.uint64(seed & MASK64)
    h ^= h >> _U33
    h *= _U_C1
    h ^= h >> _U33
    h *= _U_C2
    h ^= h >> _U33
    return h


def _positions_np(h: np.ndarray, layout: FuseLayout) -> list[np.ndarray]:
    """The ``arity`` slot indices of each hash (uint64 arrays)."""
    scl = np.uint64(layout.segment_count_length)
    sl = np.uint64(layout.segment_length)
    mask = np.uint64(layout.segment_length - 1)
    lo = h & _M32
    lo *= scl
    lo >>= _U32
    h0 = h >> _U32
    h0 *= scl
    h0 += lo
    h0 >>= _U32
    out = [h0]
    for j, s in enumerate(layout.shifts(), start=1):
        p = h >> np.uint64(s)
        p &= mask
        p ^= h0 + np.uint64(j) * sl
        out.append(p)
    return out


def _fingerprint_np(h: np.ndarray, fp_bits: int) -> np.ndarray:
    dt = np.uint8 if fp_bits == 8 else np.uint16
    return (h ^ (h >> _U32)).astype(dt)


# --- numba kernels -------------------------------------------------------------------------------------

@njit(cache=True)
def _peel(pos: np.ndarray, array_length: int, order_key: np.ndarray, order_pos: np.ndarray) -> int:
    """Peel the key hypergraph (``pos[j, i]`` = slot j of key i); returns how many keys were peeled."""
    arity, k = pos.shape
    count = np.zeros(array_length, np.int32)
    xk = np.zeros(array_length, np.int32)
    for i in range(k):
        for j in range(arity):
            p = pos[j, i]
            count[p] += 1
            xk[p] ^= i
    # Scan the slots in order and follow each cascade at once (the cascade stays within a few
    # segments of the scan point), which keeps the working set in cache; a position enters the
    # stack at most twice, so 2 * array_length bounds it.
    stack = np.empty(2 * array_length + 1, np.int32)
    done = 0
    for p0 in range(array_length):
        if count[p0] != 1:
            continue
        stack[0] = p0
        top = 1
        while top > 0:
            top -= 1
            p = stack[top]
            if count[p] != 1:
                continue
            i = xk[p]
            order_key[done] = i
            order_pos[done] = p
            done += 1
            for j in range(arity):
                q = pos[j, i]
                count[q] -= 1
                xk[q] ^= i
                if count[q] == 1:
                    stack[top] = q
                    top += 1
    return done


@njit(cache=True)
def _assign(pos: np.ndarray, fph: np.ndarray, order_key: np.ndarray, order_pos: np.ndarray,
            fps: np.ndarray) -> None:
    """Back-substitution in reverse peeling order: each key's free slot makes its xor equal its fp."""
    arity = pos.shape[0]
    for t in range(order_key.size - 1, -1, -1):
        i = order_key[t]
        p = order_pos[t]
        v = fph[i]
        for j in range(arity):
            q = pos[j, i]
            if q != p:
                v ^= fps[q]
        fps[p] = v


@njit(cache=True)
def _slots(h: np.ndarray, scl: np.uint64, sl: np.uint64, mask: np.uint64, s1: np.uint64, s2: np.uint64,
           s3: np.uint64, pos: np.ndarray) -> None:
    """``pos[j, i]`` = slot j of hash ``h[i]`` (the numba twin of :func:`_positions_np`)."""
    arity = pos.shape[0]
    for i in range(h.size):
        x = h[i]
        h0 = ((x >> np.uint64(32)) * scl + (((x & np.uint64(0xFFFFFFFF)) * scl) >> np.uint64(32))) >> np.uint64(32)
        pos[0, i] = h0
        pos[1, i] = (h0 + sl) ^ ((x >> s1) & mask)
        pos[2, i] = (h0 + sl + sl) ^ ((x >> s2) & mask)
        if arity == 4:
            pos[3, i] = (h0 + sl + sl + sl) ^ ((x >> s3) & mask)


@njit(cache=True, parallel=True)
def _query_nb(keys: np.ndarray, start: int, n: int, seed: np.uint64, scl: np.uint64, sl: np.uint64,
              mask: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64, arity: int, fpmask: np.uint64,
              fps: np.ndarray, out: np.ndarray) -> None:
    """Membership of ``keys`` (or, when ``keys`` is empty, of ``start..start+n-1``) into ``out``."""
    use_range = keys.size == 0
    chunks = (n + 65535) >> 16
    for c in prange(chunks):
        lo = c << 16
        hi = min(n, lo + 65536)
        for i in range(lo, hi):
            if use_range:
                x = np.uint64(start + i)
            else:
                x = keys[i]
            h = x + seed
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
            a = h >> np.uint64(32)
            b = h & np.uint64(0xFFFFFFFF)
            h0 = (a * scl + ((b * scl) >> np.uint64(32))) >> np.uint64(32)
            p1 = (h0 + sl) ^ ((h >> s1) & mask)
            p2 = (h0 + sl + sl) ^ ((h >> s2) & mask)
            f = (h ^ (h >> np.uint64(32))) ^ np.uint64(fps[h0]) ^ np.uint64(fps[p1]) ^ np.uint64(fps[p2])
            if arity == 4:
                p3 = (h0 + sl + sl + sl) ^ ((h >> s3) & mask)
                f ^= np.uint64(fps[p3])
            out[i] = (f & fpmask) == 0


# --- the filter ------------------------------------------------------------------------------------------

@dataclass
class FuseFilter:
    """A built binary fuse filter: layout, seed and fingerprint array (uint8 or uint16)."""

    layout: FuseLayout
    fp_bits: int
    seed: int
    fingerprints: np.ndarray

    @property
    def arity(self) -> int:
        return self.layout.arity

    @property
    def nbytes(self) -> int:
        return int(self.fingerprints.nbytes)

    # numpy -------------------------------------------------------------------------------------------
    def _contains_np(self, keys: np.ndarray) -> np.ndarray:
        h = _hash_np(keys, self.seed)
        f = _fingerprint_np(h, self.fp_bits)
        for p in _positions_np(h, self.layout):
            f ^= self.fingerprints[p]
        return f == 0

    def contains(self, keys: np.ndarray, backend: str = "auto") -> np.ndarray:
        """Membership of each key (any non-negative integers < 2^64) as a bool array."""
        k = np.ascontiguousarray(np.asarray(keys).astype(np.uint64, copy=False).ravel())
        out = np.empty(k.size, dtype=bool)
        if backend == "auto":
            backend = "numba" if HAVE_NUMBA else "numpy"
        if backend == "numba" and k.size:
            self._run_nb(k, 0, k.size, out)
            return out
        if backend not in ("numpy", "numba"):
            raise ValueError(f"unknown backend {backend!r}; valid: auto, numba, numpy")
        step = 1 << 16
        for lo in range(0, k.size, step):
            out[lo : lo + step] = self._contains_np(k[lo : lo + step])
        return out

    def query_range(self, n: int, start: int = 0, backend: str = "auto") -> np.ndarray:
        """Membership of every index of ``[start, start+n)``: the server's query-all."""
        out = np.empty(n, dtype=bool)
        if backend == "auto":
            backend = "numba" if HAVE_NUMBA else "numpy"
        if backend == "numba":
            if n:
                self._run_nb(np.zeros(0, np.uint64), start, n, out)
            return out
        if backend != "numpy":
            raise ValueError(f"unknown backend {backend!r}; valid: auto, numba, numpy")
        step = 1 << 16
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            out[lo:hi] = self._contains_np(np.arange(start + lo, start + hi, dtype=np.uint64))
        return out

    def _run_nb(self, keys: np.ndarray, start: int, n: int, out: np.ndarray) -> None:
        lay = self.layout
        sh = lay.shifts() + (0,)
        _query_nb(keys, start, n, np.uint64(self.seed), np.uint64(lay.segment_count_length),
                  np.uint64(lay.segment_length), np.uint64(lay.segment_length - 1), np.uint64(sh[0]),
                  np.uint64(sh[1]), np.uint64(sh[2]), lay.arity, np.uint64((1 << self.fp_bits) - 1),
                  self.fingerprints, out)

    # torch ---------------------------------------------------------------------------------------------
    def contains_torch(self, keys: Any, fingerprints: Any = None) -> Any:
        """Membership of an int64 tensor of keys (CPU or CUDA); bit-identical to :meth:`contains`.

        torch has no general uint64 arithmetic, so this works on int64 with two's-complement wrap
        (multiplication and addition wrap on CPU and CUDA) and masks after each right shift to make
        it logical. ``fingerprints`` may be a cached int32 tensor on the keys' device.
        """
        import torch

        dev = keys.device
        fps = fingerprints if fingerprints is not None else self.fingerprint_tensor(dev)
        lay = self.layout
        h = keys.to(torch.int64) + _signed(self.seed)
        h = h ^ _lsr(h, 33)
        h = h * _signed(_C1)
        h = h ^ _lsr(h, 33)
        h = h * _signed(_C2)
        h = h ^ _lsr(h, 33)
        scl = lay.segment_count_length
        lo = _lsr((h & 0xFFFFFFFF) * scl, 32)
        h0 = _lsr(_lsr(h, 32) * scl + lo, 32)
        f = (h ^ _lsr(h, 32)) & ((1 << self.fp_bits) - 1)
        f = f ^ torch.take(fps, h0)
        mask = lay.segment_length - 1
        for j, s in enumerate(lay.shifts(), start=1):
            p = (h0 + j * lay.segment_length) ^ (_lsr(h, s) & mask)
            f = f ^ torch.take(fps, p)
        return f == 0

    def fingerprint_tensor(self, device: Any = "cpu") -> Any:
        import torch

        return torch.from_numpy(self.fingerprints.astype(np.int64)).to(device)

    def query_range_torch(self, n: int, device: Any = "cpu", chunk: int = 1 << 22) -> Any:
        """Query-all on a torch device, in chunks (bool tensor of length ``n`` on ``device``)."""
        import torch

        fps = self.fingerprint_tensor(device)
        out = torch.empty(n, dtype=torch.bool, device=device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            out[lo:hi] = self.contains_torch(torch.arange(lo, hi, dtype=torch.int64, device=device), fps)
        return out


def _signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(x: Any, s: int) -> Any:
    """Logical right shift of an int64 tensor."""
    if s == 0:
        return x
    return (x >> s) & ((1 << (64 - s)) - 1)


def build_fuse_filter(keys: np.ndarray, arity: int = 3, fp_bits: int = 8, seed: int = 0,
                      assume_unique: bool = False) -> FuseFilter:
    """Build a filter of distinct non-negative integer keys (duplicates are removed first)."""
    if fp_bits not in (8, 16):
        raise ValueError(f"fp_bits must be 8 or 16, got {fp_bits}")
    k_arr = np.asarray(keys).ravel()
    if not assume_unique:
        k_arr = check_indices(k_arr, 1 << 63)
    k_arr = np.ascontiguousarray(k_arr.astype(np.uint64, copy=False))
    k = k_arr.size
    if k >= 1 << 32:
        raise CodecError(f"a fuse filter holds fewer than 2^32 keys; got {k}")
    layout = fuse_layout(k, arity)
    dt = np.uint8 if fp_bits == 8 else np.uint16
    state = seed & MASK64
    for attempt in range(MAX_ATTEMPTS):
        state, s = splitmix64(state)
        if attempt >= NOMINAL_ATTEMPTS:
            grow = max(1, layout.segment_count // 20)
            layout = FuseLayout(arity, layout.segment_length, layout.segment_count + grow)
        fps = np.zeros(layout.array_length, dtype=dt)
        if k == 0:
            return FuseFilter(layout, fp_bits, s, fps)
        # Sorting the hashes orders keys by their first slot (h_0 is monotone in h), so counting and
        # peeling walk the arrays nearly sequentially: 2-3x faster than key order at 1M keys (measured).
        # Only hashes are needed from here on: slots and fingerprints are functions of h.
        h = np.sort(_hash_np(k_arr, s))
        pos = np.empty((arity, k), dtype=np.uint32)
        sh = layout.shifts() + (0,)
        _slots(h, np.uint64(layout.segment_count_length), np.uint64(layout.segment_length),
               np.uint64(layout.segment_length - 1), np.uint64(sh[0]), np.uint64(sh[1]), np.uint64(sh[2]), pos)
        order_key = np.empty(k, np.int32)
        order_pos = np.empty(k, np.int32)
        if _peel(pos, layout.array_length, order_key, order_pos) == k:
            _assign(pos, _fingerprint_np(h, fp_bits), order_key, order_pos, fps)
            return FuseFilter(layout, fp_bits, s, fps)
    raise CodecError(f"binary fuse construction failed after {MAX_ATTEMPTS} attempts for {k} keys")


def warmup() -> float:
    """Compile (or load from numba's cache) the kernels; returns the seconds it took."""
    import time

    t = time.perf_counter()
    for arity in (3, 4):
        for bits in (8, 16):
            f = build_fuse_filter(np.arange(0, 200, 3), arity, bits)
            f.contains(np.arange(10))
            f.query_range(10)
    return time.perf_counter() - t


# --- codecs ----------------------------------------------------------------------------------------------

class FuseCodec(IndexCodec):
    """Common code of the four fuse filter codecs; subclasses set arity and fingerprint bits."""

    arity: ClassVar[int] = 3
    fp_bits: ClassVar[int] = 8
    lossy = True

    def encode(self, indices: np.ndarray, n: int, seed: int = 0) -> bytes:
        idx = check_indices(indices, n)
        f = build_fuse_filter(idx, self.arity, self.fp_bits, seed, assume_unique=True)
        lay = f.layout
        params = PARAMS.pack(f.seed, lay.segment_length, lay.segment_count, lay.array_length, lay.arity,
                             self.fp_bits, 0)
        return pack(self.codec_id, n, idx.size, f.fingerprints.astype(f"<u{self.fp_bits // 8}").tobytes(), params)

    def filter_of(self, data: bytes, expect_n: int | None = None) -> tuple[FuseFilter, int, int]:
        """Parse and validate a payload: (filter, n, number of keys)."""
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) != PARAMS.size:
            raise CodecError(f"{self.name}: parameter block has {len(c.params)} bytes, expected {PARAMS.size}")
        seed, sl, sc, al, arity, bits, _ = PARAMS.unpack(c.params)
        if arity != self.arity or bits != self.fp_bits:
            raise CodecError(f"{self.name}: params say arity {arity} / {bits}-bit fingerprints, "
                             f"expected {self.arity} / {self.fp_bits}")
        if sl < 1 or sl > MAX_SEGMENT_LENGTH or sl & (sl - 1):
            raise CodecError(f"{self.name}: segment length {sl} is not a power of two in 1..{MAX_SEGMENT_LENGTH}")
        if sc < 1 or (sc + arity - 1) * sl != al or sc * sl >= 1 << 32:
            raise CodecError(f"{self.name}: inconsistent sizes (segment length {sl}, count {sc}, array {al})")
        nb = self.fp_bits // 8
        if len(c.payload) != al * nb:
            raise CodecError(f"{self.name}: payload has {len(c.payload)} bytes, the array needs {al * nb}")
        if c.count > c.n:
            raise CodecError(f"{self.name}: {c.count} keys cannot fit in a universe of {c.n}")
        fps = np.frombuffer(c.payload, dtype=f"<u{nb}").astype(np.uint8 if nb == 1 else np.uint16)
        return FuseFilter(FuseLayout(arity, sl, sc), self.fp_bits, seed, fps), c.n, c.count

    def decode_mask(self, data: bytes, backend: str = "auto", *, expect_n: int | None = None) -> np.ndarray:
        """Query every index of ``[0, n)`` (members plus ~``2^-b`` of the rest)."""
        f, n, _ = self.filter_of(data, expect_n)
        check_decode_size(n, self.name)
        return f.query_range(n, backend=backend)

    def decode_mask_torch(self, data: bytes, device: Any, *, expect_n: int | None = None) -> Any:
        """:meth:`decode_mask` on a torch device (a bool tensor there; bit-identical)."""
        f, n, _ = self.filter_of(data, expect_n)
        check_decode_size(n, self.name)
        return f.query_range_torch(n, device, chunk=1 << 24 if str(device).startswith("cuda") else 1 << 22)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        return np.flatnonzero(self.decode_mask(data, expect_n=expect_n)).astype(np.int64)

    def expected_false_positives(self, k: int, n: int) -> float:
        return (n - k) * 2.0 ** -self.fp_bits

    def estimate_bits(self, k: int, n: int) -> float:
        """Exact size of the payload (the layout is a function of ``k``) barring rare regrowth."""
        lay = fuse_layout(k, self.arity)
        return 8.0 * (OVERHEAD_BYTES + PARAMS.size + lay.array_length * self.fp_bits // 8)

    def inspect(self, data: bytes) -> dict[str, Any]:
        info = super().inspect(data)
        f, n, k = self.filter_of(data)
        lay = f.layout
        info.update(seed=f.seed, arity=lay.arity, fingerprint_bits=self.fp_bits,
                    segment_length=lay.segment_length, segment_count=lay.segment_count,
                    array_length=lay.array_length, expected_false_positives=self.expected_false_positives(k, n),
                    false_positive_rate=2.0 ** -self.fp_bits)
        return info


@register
class Fuse8Codec(FuseCodec):
    name = "fuse8"
    codec_id = 1
    arity, fp_bits = 3, 8
    description = "3-wise binary fuse filter, 8-bit fingerprints (~9.0 bits/key, FP rate 2^-8)"


@register
class Fuse16Codec(FuseCodec):
    name = "fuse16"
    codec_id = 2
    arity, fp_bits = 3, 16
    description = "3-wise binary fuse filter, 16-bit fingerprints (~18.1 bits/key, FP rate 2^-16)"


@register
class Fuse8x4Codec(FuseCodec):
    name = "fuse8-4w"
    codec_id = 3
    arity, fp_bits = 4, 8
    description = "4-wise binary fuse filter, 8-bit fingerprints (~8.6 bits/key, FP rate 2^-8)"


@register
class Fuse16x4Codec(FuseCodec):
    name = "fuse16-4w"
    codec_id = 4
    arity, fp_bits = 4, 16
    description = "4-wise binary fuse filter, 16-bit fingerprints (~17.2 bits/key, FP rate 2^-16)"


__all__ = ["FuseCodec", "FuseFilter", "FuseLayout", "MAX_DECODE_N", "build_fuse_filter", "fuse_layout",
           "murmur64", "warmup"]

"""Gradient / model-update compressors of the baselines, as ``array`` codecs (ids 60..69).

Each codec turns a flat float vector ``x`` (length ``n``) into one container and back into an
estimate ``x_hat`` (float32, length ``n``). All are written from the papers; sizes below are exact
(``OVERHEAD`` = 40 bytes of container header + CRC, see :mod:`.container`). Every decoder checks
sizes before it allocates, and takes ``expect_n``: the length the caller expects, checked against the
header before anything of size ``n`` is allocated (a 40-byte payload could otherwise claim 2^36).

``qsgd`` (Alistarh et al., NeurIPS 2017, "QSGD"). ``s`` levels, buckets of ``bucket`` values (0 = one
    bucket). Per bucket ``v``: ``l_i = s|v_i|/||v||_2``; ``xi_i = floor(l_i) + Bernoulli(frac(l_i))``;
    ``x_hat_i = ||v|| sign(v_i) xi_i / s`` (unbiased, Lemma 3.1). The paper codes the levels with
    recursive Elias coding; we code the signed levels ``sign*xi + s`` (alphabet ``2s+1``) with ANS under
    their empirical histogram, which gets within a few bytes of their entropy.
    params ``<HI`` (s, bucket); payload: norms f32[nb] | histogram u32[2s+1] | ANS words u32[w].
    Bytes: ``OVERHEAD + 6 + 4*nb + 4*(2s+1) + 4*w``, ``nb = ceil(n/bucket)``.
``sign1`` (signSGD: Bernstein et al., ICML 2018; EF-signSGD: Karimireddy et al., ICML 2019). Sign bits
    (bit 1 = ``x_i >= 0``) and one scale: ``x_hat = scale * sign``. params ``<f`` (scale); payload:
    ``ceil(n/8)`` bytes. Bytes: ``OVERHEAD + 4 + ceil(n/8)``.
``topk`` (Aji & Heafield 2017; with error feedback: Stich et al., NeurIPS 2018). The ``k`` entries of
    largest magnitude: indices as a nested ``golomb`` container (Rice-coded gaps, within ~1% of
    ``log2 C(n,k)``), values as float16. params ``<I`` (length of the nested container, ``g``);
    payload: golomb container (g bytes) | f16[k]. Bytes: ``OVERHEAD + 4 + g + 2k``.
``drive`` (Vargaftik et al., NeurIPS 2021, "DRIVE"). Randomized Hadamard rotation ``R = H D/sqrt(L)``
    (``D`` random signs from the seed in params), one sign bit per rotated coordinate and one scale
    per rotation block: ``S = ||x||^2/||Rx||_1`` (unbiased variant, flag bit 0 = 1) or
    ``S = ||Rx||_1/L`` (the MSE-optimal biased variant). ``x_hat = R^-1 (S sign(Rx))``.
    params ``<QI`` (seed, block); payload: f32 scales[c] | sign bits of the ``L_total`` rotated
    coordinates. Bytes: ``OVERHEAD + 12 + 4c + ceil(L_total/8)``.
``eden`` (Vargaftik et al., ICML 2022, "EDEN"). Same rotation; rotated coordinates normalised to
    ``~N(0,1)`` and quantised to the nearest of ``2^b`` Lloyd-Max centroids of N(0,1); unbiased scale
    ``S = ||x||^2 / <Rx, q>``. ``b < 1`` (sub-bit): only ``m = ceil(p L_total)`` rotated coordinates,
    drawn without replacement from the seed, are sent with 1 bit (``p = b``); the receiver scales them
    by ``L_total/m`` and sets the rest to 0. ``S`` is computed over all coordinates of a block, so
    ``E[x_hat | R]`` equals the 1-bit EDEN estimate, which is unbiased (EDEN Thm. 2.1 for random
    rotations; approximately for Hadamard ones). params ``<QIBf`` (seed, block, bits, p); payload:
    f32 scales[c] | packed level indices (``bits`` each) of the sent coordinates.
    Bytes: ``OVERHEAD + 17 + 4c + ceil(m*bits/8)``.

Rotation blocks: the papers rotate the whole vector padded to a power of two (up to 2x the bits). We
cut ``x`` greedily into power-of-two blocks of at most ``block`` coordinates and at least
:data:`MIN_BLOCK` (only the last block is zero-padded, so fewer than ``MIN_BLOCK`` bits are wasted), and
keep one scale per block: each block is one DRIVE/EDEN instance. ``block = 0`` is the papers' form.
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from typing import Any

import numpy as np

from .base import ArrayCodec, get_codec, register
from .container import MAX_N, OVERHEAD_BYTES, CodecError, pack, unpack
from .entropy import ans_decode_symbols, ans_encode_symbols

#: smallest rotation block: bounds the zero padding of the last block (bits wasted < MIN_BLOCK).
MIN_BLOCK = 256
#: default rotation block, 2^16: one f32 scale per 65,536 coordinates costs 0.0005 bpp.
DEFAULT_BLOCK = 1 << 16

OVERHEAD = OVERHEAD_BYTES


def _flat(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32).ravel()
    if not np.isfinite(a).all():
        raise CodecError(f"{name}: the vector holds NaN or inf; check the learning rate of the local training")
    return a


def _check_n(name: str, n: int, expect_n: int | None) -> None:
    if expect_n is not None and n != expect_n:
        raise CodecError(f"{name}: payload describes {n} values, expected {expect_n}")
    if n > MAX_N:
        raise CodecError(f"{name}: n={n} is above the limit {MAX_N}")


# --- QSGD -------------------------------------------------------------------------------------------

_QSGD_PARAMS = struct.Struct("<HI")


@register
class QSGDCodec(ArrayCodec):
    name = "qsgd"
    lossy = True  # a compressor: the decoded vector estimates the input
    codec_id = 60
    description = "QSGD stochastic quantisation to s levels per bucket, ANS-coded levels (unbiased)"
    MAX_LEVELS = 1024

    def __init__(self, levels: int = 4, bucket: int = 512) -> None:
        if not 1 <= levels <= self.MAX_LEVELS:
            raise CodecError(f"qsgd: levels={levels} must be in 1..{self.MAX_LEVELS}")
        if bucket < 0:
            raise CodecError(f"qsgd: bucket={bucket} must be >= 0 (0 = one bucket)")
        self.levels, self.bucket = levels, bucket

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(norms per bucket, signed integer levels in -s..s)."""
        a = _flat(x, self.name).astype(np.float64)
        n, s = a.size, self.levels
        b = self.bucket or max(n, 1)
        nb = -(-n // b)
        pad = np.zeros(nb * b)
        pad[:n] = a
        v = pad.reshape(nb, b)
        norms = np.sqrt(np.sum(v * v, axis=1)).astype(np.float32)
        safe = np.where(norms > 0, norms.astype(np.float64), 1.0)[:, None]
        lev = np.abs(v) / safe * s
        lo = np.floor(lev)
        xi = lo + (rng.random(lev.shape) < (lev - lo))
        xi = np.minimum(xi, s)  # guards rounding when |v_i| == ||v||
        q = (np.sign(v) * xi).astype(np.int64).ravel()[:n]
        return norms, q

    def encode(self, array: np.ndarray, seed: int = 0) -> bytes:
        a = np.asarray(array).ravel()
        norms, q = self.quantize(a, np.random.default_rng(seed))
        hist, words = ans_encode_symbols(q + self.levels, 2 * self.levels + 1)
        payload = norms.astype("<f4").tobytes() + hist.astype("<u4").tobytes() + words
        return pack(self.codec_id, a.size, a.size, payload, _QSGD_PARAMS.pack(self.levels, self.bucket))

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) != _QSGD_PARAMS.size:
            raise CodecError(f"qsgd: parameter block has {len(c.params)} bytes, expected {_QSGD_PARAMS.size}")
        s, bucket = _QSGD_PARAMS.unpack(c.params)
        n = c.n
        _check_n(self.name, n, expect_n)
        if not 1 <= s <= self.MAX_LEVELS or c.count != n:
            raise CodecError(f"qsgd: bad header (levels={s}, count={c.count}, n={n})")
        b = bucket or max(n, 1)
        nb = -(-n // b) if n else 0
        head = 4 * nb + 4 * (2 * s + 1)
        if len(c.payload) < head or (len(c.payload) - head) % 4:
            raise CodecError(f"qsgd: payload of {len(c.payload)} bytes cannot hold {nb} norms, a {2 * s + 1}-symbol histogram and ANS words")
        norms = np.frombuffer(c.payload, "<f4", nb).astype(np.float64)
        hist = np.frombuffer(c.payload, "<u4", 2 * s + 1, 4 * nb).astype(np.int64)
        if not np.isfinite(norms).all() or (norms < 0).any():
            raise CodecError("qsgd: bucket norms must be finite and >= 0")
        q = ans_decode_symbols(hist, c.payload[head:], n) - s
        # q_i * (norm of i's bucket / s), in O(n): never a padded nb*b array (a forged bucket size of
        # 2^32 made that 32 GiB for a 100-byte payload). Same float64 operations, same result.
        out = q * (norms / s)[np.arange(n, dtype=np.int64) // b]
        return out.astype(np.float32)


# --- signSGD ----------------------------------------------------------------------------------------

_SIGN_PARAMS = struct.Struct("<f")


@register
class SignCodec(ArrayCodec):
    name = "sign1"
    lossy = True  # a compressor: the decoded vector estimates the input
    codec_id = 61
    description = "one sign bit per value and one f32 scale (signSGD / EF-signSGD), 1 bpp"

    def encode(self, array: np.ndarray, scale: float | None = None) -> bytes:
        """Signs of ``array``; ``scale`` defaults to ``||x||_1 / n`` (EF-signSGD's scaled sign)."""
        a = _flat(array, self.name)
        if scale is None:
            scale = float(np.abs(a).mean()) if a.size else 0.0
        if not math.isfinite(scale):
            raise CodecError(f"sign1: scale {scale} is not finite")
        bits = np.packbits(a >= 0, bitorder="little").tobytes()
        return pack(self.codec_id, a.size, a.size, bits, _SIGN_PARAMS.pack(scale))

    def decode_signs(self, data: bytes, *, expect_n: int | None = None) -> tuple[np.ndarray, float]:
        """(signs as int8 +-1, scale)."""
        c = unpack(data, self.codec_id, expect_n=expect_n)
        _check_n(self.name, c.n, expect_n)
        if len(c.params) != _SIGN_PARAMS.size or c.count != c.n:
            raise CodecError("sign1: malformed header")
        if len(c.payload) != (c.n + 7) // 8:
            raise CodecError(f"sign1: {len(c.payload)} payload bytes for n={c.n}, expected {(c.n + 7) // 8}")
        (scale,) = _SIGN_PARAMS.unpack(c.params)
        if not math.isfinite(scale):
            raise CodecError("sign1: scale is not finite")
        bits = np.unpackbits(np.frombuffer(c.payload, np.uint8), bitorder="little", count=c.n)
        return (2 * bits.astype(np.int8) - 1), float(scale)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        signs, scale = self.decode_signs(data, expect_n=expect_n)
        return (np.float32(scale) * signs).astype(np.float32)


# --- TopK -------------------------------------------------------------------------------------------

_TOPK_PARAMS = struct.Struct("<I")


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest |x| (ties broken by numpy's deterministic partition)."""
    a = np.abs(np.asarray(x))
    k = min(max(k, 0), a.size)
    if k == 0:
        return np.zeros(0, np.int64)
    if k == a.size:
        return np.arange(a.size, dtype=np.int64)
    return np.sort(np.argpartition(-a, k - 1)[:k]).astype(np.int64)


@register
class TopKCodec(ArrayCodec):
    name = "topk"
    lossy = True  # a compressor: the decoded vector estimates the input
    codec_id = 62
    description = "the k largest-magnitude values: Rice-coded indices + float16 values"

    def __init__(self, ratio: float = 0.01) -> None:
        if not 0.0 < ratio <= 1.0:
            raise CodecError(f"topk: ratio={ratio} must be in (0, 1]")
        self.ratio = ratio

    def k_for(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def encode(self, array: np.ndarray, k: int | None = None) -> bytes:
        a = _flat(array, self.name)
        idx = topk_indices(a, self.k_for(a.size) if k is None else k)
        vals = a[idx]
        if vals.size and np.abs(vals).max() > 65504.0:
            raise CodecError("topk: a kept value exceeds the float16 range (65504); lower the learning rate")
        g = get_codec("golomb", kind="indices").encode(idx, a.size)
        return pack(self.codec_id, a.size, idx.size, g + vals.astype("<f2").tobytes(), _TOPK_PARAMS.pack(len(g)))

    def decode_sparse(self, data: bytes, *, expect_n: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(indices, float32 values, n)."""
        c = unpack(data, self.codec_id, expect_n=expect_n)
        _check_n(self.name, c.n, expect_n)
        if len(c.params) != _TOPK_PARAMS.size:
            raise CodecError("topk: malformed parameter block")
        (glen,) = _TOPK_PARAMS.unpack(c.params)
        if c.count > c.n or glen + 2 * c.count != len(c.payload):
            raise CodecError(f"topk: payload of {len(c.payload)} bytes does not hold a {glen}-byte index set and {c.count} f16 values")
        gcodec = get_codec("golomb", kind="indices")
        g = c.payload[:glen]
        gc = unpack(g, gcodec.codec_id)
        if gc.n != c.n or gc.count != c.count:
            raise CodecError(f"topk: index set is {gc.count} of {gc.n}, header says {c.count} of {c.n}")
        idx = gcodec.decode(g)
        vals = np.frombuffer(c.payload, "<f2", c.count, glen).astype(np.float32)
        return idx, vals, c.n

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        idx, vals, n = self.decode_sparse(data, expect_n=expect_n)
        out = np.zeros(n, np.float32)
        out[idx] = vals
        return out


# --- randomized Hadamard rotation (DRIVE, EDEN) ------------------------------------------------------

def block_sizes(n: int, block: int) -> list[int]:
    """Power-of-two rotation blocks covering ``n`` coordinates (last one zero-padded)."""
    if block and (block < MIN_BLOCK or block & (block - 1)):
        raise CodecError(f"rotation block {block} must be 0 or a power of two >= {MIN_BLOCK}")
    if n == 0:
        return []
    if block == 0:
        return [max(MIN_BLOCK, 1 << (n - 1).bit_length())]
    sizes, rest = [], n
    while rest >= block:
        sizes.append(block)
        rest -= block
    while rest >= MIN_BLOCK:
        p = 1 << (rest.bit_length() - 1)
        sizes.append(p)
        rest -= p
    if rest:
        sizes.append(MIN_BLOCK)
    return sizes


def fwht(a: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform along the last axis (length a power of two), in place."""
    rows, L = a.shape
    h = 1
    while h < L:
        v = a.reshape(rows, L // (2 * h), 2, h)
        x, y = v[:, :, 0, :].copy(), v[:, :, 1, :]
        v[:, :, 0, :] += y
        v[:, :, 1, :] = x - y
        h *= 2
    return a


class Rotation:
    """``R = H D / sqrt(L)`` per block, with ``D`` random signs drawn from ``seed``."""

    def __init__(self, n: int, block: int, seed: int) -> None:
        self.n = n
        self.sizes = block_sizes(n, block)
        self.total = int(sum(self.sizes))
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.signs = np.where(np.random.default_rng(seed).random(self.total) < 0.5, -1.0, 1.0)

    def _apply(self, v: np.ndarray, pre: bool) -> np.ndarray:
        out = v.copy()
        if pre:
            out *= self.signs
        for L in sorted(set(self.sizes)):
            ids = [i for i, s in enumerate(self.sizes) if s == L]
            rows = np.stack([out[self.starts[i] : self.starts[i] + L] for i in ids])
            fwht(rows)
            rows /= math.sqrt(L)
            for r, i in zip(rows, ids):
                out[self.starts[i] : self.starts[i] + L] = r
        if not pre:
            out *= self.signs
        return out

    def rotate(self, x: np.ndarray) -> np.ndarray:
        v = np.zeros(self.total)
        v[: self.n] = x
        return self._apply(v, pre=True)

    def unrotate(self, z: np.ndarray) -> np.ndarray:
        return self._apply(np.asarray(z, np.float64), pre=False)[: self.n]

    def blocks(self, v: np.ndarray) -> list[np.ndarray]:
        return [v[self.starts[i] : self.starts[i + 1]] for i in range(len(self.sizes))]


@lru_cache(maxsize=16)
def lloyd_max_normal(bits: int, iters: int = 300) -> np.ndarray:
    """The 2^bits Lloyd-Max centroids of N(0,1) (Max 1960; EDEN quantises rotated coordinates with them).
    1 bit: +-sqrt(2/pi) = +-0.7979; 2 bits: +-0.4528, +-1.5104."""
    from math import erf, exp, pi, sqrt

    k = 1 << bits
    pdf = lambda t: exp(-t * t / 2) / sqrt(2 * pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + erf(t / sqrt(2)))  # noqa: E731
    c = np.linspace(-2.0, 2.0, k) if k > 1 else np.zeros(1)
    for _ in range(iters):
        edges = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(k - 1)] + [math.inf]
        new = []
        for i in range(k):
            a, b = edges[i], edges[i + 1]
            pa = 0.0 if a == -math.inf else pdf(a)
            pb = 0.0 if b == math.inf else pdf(b)
            mass = cdf(b) - cdf(a)
            new.append((pa - pb) / mass if mass > 0 else c[i])
        c = np.array(new)
    return c


_ROT_PARAMS = struct.Struct("<QI")
_EDEN_PARAMS = struct.Struct("<QIBf")
_DRIVE_UNBIASED = 1  # flag bit


def _read_scales(c: Any, nblocks: int, name: str) -> np.ndarray:
    if len(c.payload) < 4 * nblocks:
        raise CodecError(f"{name}: payload of {len(c.payload)} bytes cannot hold {nblocks} block scales")
    s = np.frombuffer(c.payload, "<f4", nblocks).astype(np.float64)
    if not np.isfinite(s).all():
        raise CodecError(f"{name}: a block scale is not finite")
    return s


@register
class DriveCodec(ArrayCodec):
    name = "drive"
    lossy = True  # a compressor: the decoded vector estimates the input
    codec_id = 63
    description = "DRIVE: randomized Hadamard rotation, 1 sign bit per coordinate, one scale per block"

    def __init__(self, unbiased: bool = True, block: int = DEFAULT_BLOCK) -> None:
        block_sizes(MIN_BLOCK, block)  # validates block
        self.unbiased, self.block = unbiased, block

    def encode(self, array: np.ndarray, seed: int = 0) -> bytes:
        x = _flat(array, self.name).astype(np.float64)
        rot = Rotation(x.size, self.block, seed)
        z = rot.rotate(x)
        scales = []
        for zb in rot.blocks(z):
            l1 = float(np.abs(zb).sum())
            if self.unbiased:
                scales.append(float(zb @ zb) / l1 if l1 > 0 else 0.0)  # ||x_b||^2 = ||z_b||^2 (R orthonormal)
            else:
                scales.append(l1 / zb.size)
        payload = np.asarray(scales, "<f4").tobytes() + np.packbits(z >= 0, bitorder="little").tobytes()
        flags = _DRIVE_UNBIASED if self.unbiased else 0
        return pack(self.codec_id, x.size, x.size, payload, _ROT_PARAMS.pack(seed & ((1 << 64) - 1), self.block), flags)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        _check_n(self.name, c.n, expect_n)
        if len(c.params) != _ROT_PARAMS.size or c.count != c.n:
            raise CodecError("drive: malformed header")
        seed, block = _ROT_PARAMS.unpack(c.params)
        try:
            sizes = block_sizes(c.n, block)
        except CodecError as e:
            raise CodecError(f"drive: {e}") from None
        total = int(sum(sizes))
        if len(c.payload) != 4 * len(sizes) + (total + 7) // 8:
            raise CodecError(f"drive: payload of {len(c.payload)} bytes, expected {4 * len(sizes) + (total + 7) // 8} for n={c.n}")
        scales = _read_scales(c, len(sizes), self.name)
        rot = Rotation(c.n, block, seed)
        bits = np.unpackbits(np.frombuffer(c.payload, np.uint8, offset=4 * len(sizes)), bitorder="little", count=total)
        z = 2.0 * bits - 1.0
        z *= np.repeat(scales, sizes)
        return rot.unrotate(z).astype(np.float32)


@register
class EdenCodec(ArrayCodec):
    name = "eden"
    lossy = True  # a compressor: the decoded vector estimates the input
    codec_id = 64
    description = "EDEN: rotation + Lloyd-Max quantisation with an unbiased scale; sub-bit by random sub-sampling"
    MAX_BITS = 8

    def __init__(self, bits: float = 1.0, block: int = DEFAULT_BLOCK) -> None:
        block_sizes(MIN_BLOCK, block)
        if bits < 1.0:
            if not 0.0 < bits:
                raise CodecError(f"eden: bits={bits} must be > 0")
            self.qbits, self.p = 1, float(bits)
        else:
            if bits != int(bits) or not 1 <= bits <= self.MAX_BITS:
                raise CodecError(f"eden: bits={bits} must be in (0, 1) or an integer 1..{self.MAX_BITS}")
            self.qbits, self.p = int(bits), 1.0
        self.block = block

    @staticmethod
    def sample(total: int, p: float, seed: int) -> np.ndarray | None:
        """Sorted coordinates sent in the sub-bit regime (shared randomness), or None (all)."""
        if p >= 1.0:
            return None
        m = min(total, max(1, math.ceil(p * total)))
        rng = np.random.default_rng([seed, 0x5EB])
        return np.sort(rng.choice(total, size=m, replace=False))

    def encode(self, array: np.ndarray, seed: int = 0) -> bytes:
        x = _flat(array, self.name).astype(np.float64)
        rot = Rotation(x.size, self.block, seed)
        z = rot.rotate(x)
        cent = lloyd_max_normal(self.qbits)
        edges = (cent[1:] + cent[:-1]) / 2
        scales, levels = [], []
        for zb in rot.blocks(z):
            nrm = math.sqrt(float(zb @ zb))
            zn = zb * (math.sqrt(zb.size) / nrm) if nrm > 0 else zb
            lev = np.searchsorted(edges, zn).astype(np.int64)
            q = cent[lev]
            dot = float(zb @ q)
            scales.append(nrm * nrm / dot if dot > 0 else 0.0)  # EDEN's unbiased scale ||x||^2 / <Rx, Q(Rx)>
            levels.append(lev)
        lev = np.concatenate(levels) if levels else np.zeros(0, np.int64)
        sel = self.sample(rot.total, self.p, seed)
        if sel is not None:
            lev = lev[sel]
        shifts = np.arange(self.qbits, dtype=np.int64)
        bitmat = ((lev[:, None] >> shifts[None, :]) & 1).astype(np.uint8).ravel()
        payload = np.asarray(scales, "<f4").tobytes() + np.packbits(bitmat, bitorder="little").tobytes()
        params = _EDEN_PARAMS.pack(seed & ((1 << 64) - 1), self.block, self.qbits, self.p)
        return pack(self.codec_id, x.size, x.size, payload, params)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        _check_n(self.name, c.n, expect_n)
        if len(c.params) != _EDEN_PARAMS.size or c.count != c.n:
            raise CodecError("eden: malformed header")
        seed, block, qbits, p = _EDEN_PARAMS.unpack(c.params)
        if not 1 <= qbits <= self.MAX_BITS or not (0.0 < p <= 1.0) or (p < 1.0 and qbits != 1):
            raise CodecError(f"eden: bad parameters (bits={qbits}, p={p})")
        try:
            sizes = block_sizes(c.n, block)
        except CodecError as e:
            raise CodecError(f"eden: {e}") from None
        total = int(sum(sizes))
        m = total if p >= 1.0 else min(total, max(1, math.ceil(p * total))) if total else 0
        if len(c.payload) != 4 * len(sizes) + (m * qbits + 7) // 8:
            raise CodecError(f"eden: payload of {len(c.payload)} bytes, expected {4 * len(sizes) + (m * qbits + 7) // 8} for n={c.n}")
        scales = _read_scales(c, len(sizes), self.name)
        bits = np.unpackbits(np.frombuffer(c.payload, np.uint8, offset=4 * len(sizes)), bitorder="little", count=m * qbits)
        lev = bits.reshape(m, qbits).astype(np.int64) @ (np.int64(1) << np.arange(qbits, dtype=np.int64))
        q = lloyd_max_normal(qbits)[lev]
        sel = self.sample(total, float(p), seed)
        if sel is None:
            z = q
        else:
            z = np.zeros(total)
            z[sel] = q * (total / m)
        z = z * np.repeat(scales, sizes)
        return Rotation(c.n, block, seed).unrotate(z).astype(np.float32)


@register
class Int64Codec(ArrayCodec):
    name = "i64"
    codec_id = 65
    description = "a short 1-D int64 vector (control fields of a message, e.g. the baselines' sync manifest)"
    MAX_LEN = 64

    def encode(self, array: np.ndarray) -> bytes:
        a = np.asarray(array)
        if a.ndim != 1 or a.size > self.MAX_LEN or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise CodecError(f"i64: expects a 1-D integer vector of at most {self.MAX_LEN} entries, got {a.dtype} {a.shape}")
        return pack(self.codec_id, a.size, a.size, a.astype("<i8").tobytes())

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if c.n > self.MAX_LEN or c.count != c.n or len(c.payload) != 8 * c.n:
            raise CodecError(f"i64: header says {c.n} values, payload has {len(c.payload)} bytes")
        return np.frombuffer(c.payload, "<i8").astype(np.int64)


def wire_bytes(codec: str, n: int, **kw: Any) -> int:
    """The documented size formula of a payload, in bytes (``qsgd``/``topk`` need ``words``/``g``)."""
    if codec == "sign1":
        return OVERHEAD + 4 + (n + 7) // 8
    if codec == "qsgd":
        s, bucket = kw["levels"], kw["bucket"]
        nb = -(-n // (bucket or max(n, 1)))
        return OVERHEAD + 6 + 4 * nb + 4 * (2 * s + 1) + 4 * kw["words"]
    if codec == "topk":
        return OVERHEAD + 4 + kw["g"] + 2 * kw["k"]
    sizes = block_sizes(n, kw.get("block", DEFAULT_BLOCK))
    total = sum(sizes)
    if codec == "drive":
        return OVERHEAD + 12 + 4 * len(sizes) + (total + 7) // 8
    if codec == "eden":
        bits = kw.get("bits", 1.0)
        qb, m = (1, min(total, max(1, math.ceil(bits * total)))) if bits < 1 else (int(bits), total)
        return OVERHEAD + 17 + 4 * len(sizes) + (m * qb + 7) // 8
    raise KeyError(f"no size formula for codec {codec!r}; valid: qsgd, sign1, topk, drive, eden")

"""Dense payloads: bit-packed masks, float arrays, and the downlink keep-probabilities.

``bitpack``   a boolean mask as n bits (FedPM's raw uplink, exactly 1 bpp plus the container).
``f32``/``f16``  a float tensor, little-endian IEEE; params hold ndim (u8) and the shape (u64 each).
``probs-f32``   the keep-probabilities as raw float32 (32 bpp; the naive downlink, for comparison).
``probs-counts`` the keep-probabilities when they are a function of integer counts: with Beta(1,1)
              priors reset every round and unweighted aggregation, ``theta = f(c)`` where ``c`` in
              ``0..K`` is how many of the K aggregated clients kept the weight. We send ``c``
              ANS-coded under its own empirical histogram (sent in the params), and the receiver
              recomputes ``theta`` with :func:`theta_from_counts`, exactly as the server does.
``probs-q8``  any probabilities: uniformly quantized to 8 bits (``q = round(theta*255)``, absolute
              error at most 1/510 ~ 0.00196, plus < 1e-7 of float32 rounding; tested) then ANS-coded
              under the empirical histogram of the levels. Probabilities below 1/510 decode to 0.0
              and above 1 - 1/510 to 1.0: receivers that take logits must clip (the method's
              eps = 0.01 clip keeps theta inside [3/255, 252/255] after quantization).

Both downlink codecs are far below 32 bpp: with K = 10 clients and counts ~ Bin(10, 1/2) they cost
~2.7 bpp (the entropy of the counts), measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np

from .base import ArrayCodec, Levels, MaskCodec, ProbsCodec, register
from .container import MAX_N, CodecError, pack, unpack
from .entropy import ANS_EMPIRICAL, CHUNK, EmpiricalCoder

_STAT_IDS = {"mean": 0, "mode": 1}
_COUNTS_PARAMS = struct.Struct("<IBfff")  # total K, stat, eps, prior_a, prior_b


def counts_table(total: int, stat: str = "mean", eps: float = 0.01, prior: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``theta`` for every count ``0..total`` (float32[total + 1]): the Beta posterior statistic, clipped."""
    a0, b0 = prior
    c = np.arange(total + 1, dtype=np.float64)
    if stat == "mean":
        th = (a0 + c) / (a0 + b0 + total)
    elif stat == "mode":
        denom = a0 + b0 + total - 2.0
        th = (a0 - 1.0 + c) / denom if denom > 0 else np.full_like(c, 0.5)
    else:
        raise ValueError(f"unknown posterior statistic {stat!r}; valid: mean, mode")
    return np.clip(th, eps, 1.0 - eps).astype(np.float32)


def lookup(table: np.ndarray, symbols: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``table[symbols]`` in blocks (numpy would make an intp copy of all the indices first)."""
    sym = np.asarray(symbols).ravel()
    if out is None:
        out = np.empty(sym.size, dtype=table.dtype)
    for lo in range(0, sym.size, CHUNK):
        np.take(table, sym[lo : lo + CHUNK], out=out[lo : lo + CHUNK], mode="raise")
    return out


def theta_from_counts(
    counts: np.ndarray, total: int, stat: str = "mean", eps: float = 0.01, prior: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Beta-posterior keep-probability from ``counts`` ones out of ``total`` masks (float32, clipped).

    Element ``i`` is ``counts_table(...)[counts[i]]``: the statistic evaluated once per possible count
    in float64 and looked up, the same float32 as evaluating it per element."""
    c = np.asarray(counts)
    table = counts_table(total, stat, eps, prior)
    if c.size and (c.min() < 0 or c.max() > total):
        raise ValueError(f"counts must lie in 0..{total}")
    return lookup(table, c).reshape(c.shape)


# --- masks ------------------------------------------------------------------------------------------

@register
class BitpackCodec(MaskCodec):
    name = "bitpack"
    codec_id = 30
    description = "raw 1-bit mask, n bits (FedPM)"

    def encode(self, mask: np.ndarray, probs: np.ndarray | None = None) -> bytes:
        m = np.asarray(mask).astype(bool, copy=False).ravel()
        return pack(self.codec_id, m.size, int(m.sum()), np.packbits(m, bitorder="little").tobytes())

    def decode(self, data: bytes, probs: np.ndarray | None = None, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.payload) != (c.n + 7) // 8:
            raise CodecError(f"bitpack: {len(c.payload)} payload bytes for n={c.n}, expected {(c.n + 7) // 8}")
        m = np.unpackbits(np.frombuffer(c.payload, np.uint8), bitorder="little", count=c.n).astype(bool)
        if int(m.sum()) != c.count:
            raise CodecError(f"bitpack: mask has {int(m.sum())} ones, header says {c.count}")
        return m


# --- float arrays -----------------------------------------------------------------------------------

class _FloatArrayCodec(ArrayCodec):
    dtype: str = "<f4"

    def encode(self, array: np.ndarray) -> bytes:
        a = np.asarray(array)
        if a.ndim > 8:
            raise CodecError(f"{self.name}: arrays of more than 8 dimensions are not supported")
        params = struct.pack(f"<B{a.ndim}Q", a.ndim, *a.shape)
        return pack(self.codec_id, a.size, a.size, a.astype(self.dtype).tobytes(), params)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if not c.params or c.params[0] > 8 or len(c.params) != 1 + 8 * c.params[0]:
            raise CodecError(f"{self.name}: malformed shape block")
        shape = struct.unpack(f"<{c.params[0]}Q", c.params[1:])
        size = int(np.prod(shape, dtype=np.float64)) if shape else 1
        item = np.dtype(self.dtype).itemsize
        if size != c.n or size * item != len(c.payload):
            raise CodecError(f"{self.name}: shape {shape} needs {size * item} bytes, payload has {len(c.payload)}")
        return np.frombuffer(c.payload, dtype=self.dtype).astype(np.float32).reshape(shape)


@register
class Float32Codec(_FloatArrayCodec):
    name = "f32"
    codec_id = 40
    dtype = "<f4"
    description = "float32 tensor (32 bits per value)"


@register
class Float16Codec(_FloatArrayCodec):
    name = "f16"
    codec_id = 41
    dtype = "<f2"
    description = "float16 tensor (16 bits per value)"


# --- downlink probabilities ---------------------------------------------------------------------------

@register
class ProbsFloat32Codec(ProbsCodec):
    name = "probs-f32"
    codec_id = 50
    description = "keep-probabilities as raw float32 (32 bpp)"

    def encode(self, theta: np.ndarray, counts: np.ndarray | None = None, total: int | None = None) -> bytes:
        t = np.asarray(theta, dtype="<f4").ravel()
        return pack(self.codec_id, t.size, t.size, t.tobytes())

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.payload) != 4 * c.n or c.count != c.n:
            raise CodecError(f"probs-f32: {len(c.payload)} bytes and count={c.count} for n={c.n}")
        theta = np.frombuffer(c.payload, dtype="<f4").astype(np.float32)
        if theta.size and not (np.isfinite(theta).all() and theta.min() >= 0 and theta.max() <= 1):
            raise CodecError("probs-f32: keep-probabilities must be finite and in [0, 1]")
        return theta

    def reconstruct(self, theta: np.ndarray | None, counts: np.ndarray | None = None, total: int | None = None) -> np.ndarray:
        return np.asarray(theta, dtype=np.float32).ravel().copy()


@register
class ProbsCountsCodec(ProbsCodec):
    name = "probs-counts"
    codec_id = 51
    description = "integer keep-counts 0..K, ANS-coded; exact when priors reset every round"
    #: how the counts are coded under their own histogram (the entropy model); ``probs-counts-rans`` is the
    #: same message with another coder
    coder: ClassVar[EmpiricalCoder] = ANS_EMPIRICAL

    #: The statistic, eps and prior that turn counts into probabilities; the server sets them.
    def __init__(self, stat: str = "mean", eps: float = 0.01, prior: tuple[float, float] = (1.0, 1.0)) -> None:
        if stat not in _STAT_IDS:
            raise ValueError(f"unknown posterior statistic {stat!r}; valid: {', '.join(_STAT_IDS)}")
        self.stat, self.eps, self.prior = stat, eps, prior

    def applicable(self, counts: np.ndarray | None, total: int | None) -> bool:
        return counts is not None and total is not None and 0 < total <= 1000

    def checked_counts(self, counts: np.ndarray | None, total: int | None) -> np.ndarray:
        """The counts as a flat integer array, after checking they can be sent (every counts codec)."""
        if not self.applicable(counts, total):
            raise CodecError(f"{self.name} needs integer counts and 0 < total <= 1000 (priors reset every round)")
        c = np.asarray(counts).ravel()
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise CodecError(f"{self.name}: counts must be integers, got {c.dtype}")
        if c.size and (c.min() < 0 or c.max() > total):
            raise CodecError(f"counts must lie in 0..{total}")
        return c

    def encode(self, theta: np.ndarray | None, counts: np.ndarray | None = None, total: int | None = None) -> bytes:
        c = self.checked_counts(counts, total)
        hist, side, words = self.coder.encode(c, total + 1)
        params = _COUNTS_PARAMS.pack(total, _STAT_IDS[self.stat], self.eps, *self.prior) + self.coder.params(hist, side)
        return pack(self.codec_id, c.size, c.size, words, params)

    def decode_counts(self, data: bytes, *, expect_n: int | None = None) -> tuple[np.ndarray, int, str, float, tuple[float, float]]:
        """(counts as int64, total, statistic, eps, prior) from a payload."""
        hist, side, words, n, total, stat, eps, prior = self._parse(data, expect_n)
        return self.coder.decode(hist, side, words, n), total, stat, eps, prior

    def _parse(self, data: bytes, expect_n: int | None = None) -> tuple[np.ndarray, bytes, bytes, int, int, str, float, tuple[float, float]]:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) < _COUNTS_PARAMS.size:
            raise CodecError(f"{self.name}: parameter block too short")
        total, stat_id, eps, a0, b0 = _COUNTS_PARAMS.unpack_from(c.params)
        stat = {v: k for k, v in _STAT_IDS.items()}.get(stat_id)
        if stat is None or not 0 < total <= 1000 or not 0.0 <= eps < 0.5:
            raise CodecError(f"{self.name}: bad parameters (total={total}, stat={stat_id}, eps={eps})")
        if c.n != c.count or c.n > MAX_N:
            raise CodecError(f"{self.name}: n and count disagree")
        hist, side = self.coder.parse_params(c.params[_COUNTS_PARAMS.size :], total + 1, self.name)
        return hist, side, c.payload, c.n, total, stat, eps, (a0, b0)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        """theta, decoded and looked up block by block (never an array of all the counts)."""
        hist, side, words, n, total, stat, eps, prior = self._parse(data, expect_n)
        return self.coder.decode(hist, side, words, n, table=counts_table(total, stat, eps, prior))

    def levels(self, theta: np.ndarray, counts: np.ndarray | None = None, total: int | None = None) -> Levels | None:
        """The keep-counts, in the narrowest unsigned dtype (None without counts)."""
        if counts is None or total is None:
            return None
        c = np.asarray(counts).ravel()
        return "counts", int(total), c.astype(np.uint8 if total <= 255 else np.uint16, copy=False)

    def decode_levels(self, data: bytes, *, expect_n: int | None = None) -> tuple[np.ndarray, Levels | None]:
        counts, total, stat, eps, prior = self.decode_counts(data, expect_n=expect_n)
        theta = theta_of_levels("counts", total, counts, stat, eps, prior)  # = self.decode(data)
        return theta, self.levels(theta, counts, total)

    def reconstruct(self, theta: np.ndarray | None, counts: np.ndarray | None = None, total: int | None = None) -> np.ndarray:
        """theta from the counts, with eps and the prior rounded to float32 as the header carries them."""
        if not self.applicable(counts, total):
            raise CodecError("probs-counts needs integer counts and 0 < total <= 1000 (priors reset every round)")
        _, _, eps, a0, b0 = _COUNTS_PARAMS.unpack(_COUNTS_PARAMS.pack(total, 0, self.eps, *self.prior))
        return theta_from_counts(np.asarray(counts).ravel(), int(total), self.stat, eps, (a0, b0))


@register
class ProbsQ8Codec(ProbsCodec):
    name = "probs-q8"
    codec_id = 52
    description = "keep-probabilities quantized to 8 bits (error <= 1/510), ANS-coded"

    def encode(self, theta: np.ndarray, counts: np.ndarray | None = None, total: int | None = None) -> bytes:
        q = _quantize8(theta)
        hist, side, words = ANS_EMPIRICAL.encode(q, 256)
        return pack(self.codec_id, q.size, q.size, words, ANS_EMPIRICAL.params(hist, side))

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if c.count != c.n:
            raise CodecError(f"probs-q8: n={c.n} and count={c.count} disagree")
        hist, side = ANS_EMPIRICAL.parse_params(c.params, 256, self.name)
        return ANS_EMPIRICAL.decode(hist, side, c.payload, c.n, table=_Q8_TABLE)

    def reconstruct(self, theta: np.ndarray | None, counts: np.ndarray | None = None, total: int | None = None) -> np.ndarray:
        return lookup(_Q8_TABLE, _quantize8(theta))

    def levels(self, theta: np.ndarray, counts: np.ndarray | None = None, total: int | None = None) -> Levels | None:
        """The 8-bit levels ``rint(255 theta)``."""
        return "q8", 255, _quantize8(theta)

    def decode_levels(self, data: bytes, *, expect_n: int | None = None) -> tuple[np.ndarray, Levels | None]:
        theta = self.decode(data, expect_n=expect_n)
        return theta, self.levels(theta)


def theta_of_levels(kind: str, total: int, levels: np.ndarray, stat: str, eps: float, prior: tuple[float, float]) -> np.ndarray:
    """theta from integer levels of ``kind`` (``counts``: keep-counts of ``total`` masks with the posterior's
    statistic, eps and prior; ``q8``: 8-bit levels): what the snapshot codec that sent them decodes."""
    if kind == "counts":
        return theta_from_counts(levels, total, stat, eps, prior)
    if kind == "q8":
        return lookup(_Q8_TABLE, levels)
    raise CodecError(f"unknown level kind {kind!r}")


#: level q in 0..255 decodes to float32(q) / float32(255)
_Q8_TABLE = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float32)


def _quantize8(theta: np.ndarray | None) -> np.ndarray:
    """``rint(theta * 255)`` as uint8, in float64 blocks; refuses non-finite or out-of-[0, 1] values."""
    if theta is None:
        raise CodecError("probs-q8 needs the probabilities")
    t = np.asarray(theta).ravel()
    q = np.empty(t.size, dtype=np.uint8)
    for lo in range(0, t.size, CHUNK):
        b = t[lo : lo + CHUNK].astype(np.float64)
        if not np.isfinite(b).all() or b.min() < 0 or b.max() > 1:
            raise CodecError("probs-q8: probabilities must be finite and in [0, 1]")
        q[lo : lo + CHUNK] = np.rint(b * 255.0)
    return q

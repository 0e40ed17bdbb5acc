"""Exact (lossless) codecs of a sparse sorted index set.

``golomb``: Golomb-Rice coding of the gaps between consecutive indices. For ``k`` uniform positions
in ``[0, n)`` the gaps are close to geometric with ``p = k/n``, for which a Rice code with parameter
``b ~ log2(ln 2 / p)`` is within ~1% of ``log2 C(n, k)`` (REFERENCE.md: 9.11 vs 9.08 bits/key at 0.5%).
We pick ``b`` exactly: the total size is ``sum(q_i) + k*(b+1)`` bits, evaluated for a few ``b``.

Layout, chosen so that both directions are vectorized numpy (no per-key Python loop): the unary
quotients and the fixed-width remainders are two separate bit streams::

    params  : b (u8), unary_bits (u64)
    payload : unary stream (ceil(unary_bits/8) bytes; each quotient q as q zero bits then a one bit,
              LSB-first within each byte) | remainder stream (ceil(k*b/8) bytes, each remainder as b
              bits, most significant first, LSB-first bit order within each byte)

``ans``: the same gap split ``g = q * 2^b + r`` entropy-coded with constriction's ANS coder. For
uniform positions the gaps are (nearly) geometric, for which ``q`` and ``r`` are independent, ``q`` is
geometric and ``r`` a truncated geometric, so coding ``q`` under its empirical histogram and the top
``b - lo`` bits of ``r`` under the exact truncated-geometric model reaches the geometric entropy, i.e.
``log2 C(n, k)`` up to a few header bytes (REFERENCE.md: 11.41 / 9.08 / 8.08 / 5.73 bits/key at
k/n = 0.1 / 0.5 / 1 / 5 %). Layout (see docs/wire-format.md)::

    params  : b (u8), lo (u8), qsize (u16), ratio (f64), hist_q (u32 x qsize)
    payload : low-bit stream (ceil(k*lo/8) bytes: the lo low bits of each r, fixed width, LSB-first)
              | ANS words (u32 little-endian; constriction AnsCoder): q_0..q_{k-1} under
              Categorical(hist_q), then h_0..h_{k-1} (h = r >> lo) under Categorical(w), where
              w_j = max(ratio^j, 1e-9) for j < 2^(b-lo), computed as a float64 running product.

``bernoulli-ans`` (a mask codec): a dense mask under per-position Bernoulli(probs) shared by both
sides (FedPM's entropy-coded baseline), probabilities clipped to ``[eps, 1-eps]`` with ``eps`` in
the params (default 1e-6, far above constriction's 2^-24 probability resolution).
"""

from __future__ import annotations

import struct

import numpy as np

from .base import IndexCodec, MaskCodec, check_indices, log2_binomial, register
from .container import CodecError, check_decode_size, pack, unpack
from .entropy import AnsReader, Bernoulli, Categorical, ans_write

_GOLOMB_PARAMS = struct.Struct("<BQ")


def _rice_sizes(gaps: np.ndarray, b: int) -> int:
    return int(np.sum(gaps >> b, dtype=np.int64)) + gaps.size * (b + 1)


def best_rice_parameter(gaps: np.ndarray, n: int) -> int:
    """The Rice parameter in a small window around the geometric optimum that minimises the size."""
    k = gaps.size
    if k == 0:
        return 0
    p = min(max(k / max(n, 1), 1e-12), 1.0)
    guess = max(0, int(round(np.log2(max(np.log(2) / p, 1.0)))))
    cands = range(max(0, guess - 2), min(guess + 3, 63))
    return min(cands, key=lambda b: _rice_sizes(gaps, b))


@register
class GolombRiceCodec(IndexCodec):
    name = "golomb"
    codec_id = 10
    description = "Golomb-Rice coding of index gaps (exact, ~1% above log2 C(n,k))"

    def encode(self, indices: np.ndarray, n: int, seed: int = 0) -> bytes:
        idx = check_indices(indices, n)
        k = idx.size
        gaps = np.diff(idx, prepend=-1) - 1  # >= 0
        b = best_rice_parameter(gaps, n)
        q = gaps >> b
        unary_bits = int(q.sum()) + k
        ubits = np.zeros(unary_bits, dtype=np.uint8)
        if k:
            ubits[np.cumsum(q + 1) - 1] = 1
        unary = np.packbits(ubits, bitorder="little").tobytes()
        if b:
            r = (gaps & ((1 << b) - 1)).astype(np.uint64)
            shifts = np.arange(b - 1, -1, -1, dtype=np.uint64)
            rbits = ((r[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8).ravel()
            rem = np.packbits(rbits, bitorder="little").tobytes()
        else:
            rem = b""
        return pack(self.codec_id, n, k, unary + rem, _GOLOMB_PARAMS.pack(b, unary_bits))

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) != _GOLOMB_PARAMS.size:
            raise CodecError(f"golomb: parameter block has {len(c.params)} bytes, expected {_GOLOMB_PARAMS.size}")
        b, unary_bits = _GOLOMB_PARAMS.unpack(c.params)
        k, n = c.count, c.n
        if b > 62:
            raise CodecError(f"golomb: Rice parameter {b} is out of range")
        if k > n:
            raise CodecError(f"golomb: {k} keys cannot fit in a universe of {n}")
        ulen = (unary_bits + 7) // 8
        rlen = (k * b + 7) // 8
        if ulen + rlen != len(c.payload) or unary_bits < k:
            raise CodecError(
                f"golomb: payload is {len(c.payload)} bytes but the header implies {ulen}+{rlen} "
                f"(k={k}, b={b}, unary_bits={unary_bits})"
            )
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        ubits = np.unpackbits(np.frombuffer(c.payload, np.uint8, ulen), bitorder="little", count=unary_bits)
        ones = np.flatnonzero(ubits)
        if ones.size != k or ones[-1] != unary_bits - 1:
            raise CodecError(f"golomb: unary stream holds {ones.size} codes, header says {k}")
        q = np.diff(ones, prepend=-1) - 1
        gaps = q.astype(np.int64) << b
        if b:
            rb = np.unpackbits(np.frombuffer(c.payload, np.uint8, rlen, ulen), bitorder="little", count=k * b)
            weights = (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
            gaps |= rb.reshape(k, b).astype(np.int64) @ weights
        idx = np.cumsum(gaps + 1) - 1
        if idx[-1] >= n:
            raise CodecError(f"golomb: decoded index {idx[-1]} is outside [0, {n})")
        if gaps.min() < 0 or idx[0] < 0 or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise CodecError("golomb: decoded indices are not increasing within [0, n) (a gap overflowed): the payload is forged or corrupted")
        return idx

    def estimate_bits(self, k: int, n: int) -> float:
        return 8.0 * 49 + 1.01 * log2_binomial(n, k)


# --- fixed-width bit fields -----------------------------------------------------------------------------

def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers as ``width``-bit fields, value LSB first, LSB-first within bytes."""
    if width == 0 or values.size == 0:
        return b""
    v = values.astype(np.uint64, copy=False)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack_fixed(buf: bytes, count: int, width: int, offset: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_fixed` (int64)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    nbytes = (count * width + 7) // 8
    bits = np.unpackbits(np.frombuffer(buf, np.uint8, nbytes, offset), bitorder="little", count=count * width)
    weights = np.int64(1) << np.arange(width, dtype=np.int64)
    return bits.reshape(count, width).astype(np.int64) @ weights


# --- ANS coding of the gaps --------------------------------------------------------------------------------

_ANS_PARAMS = struct.Struct("<BBHd")
#: Largest quotient alphabet (keeps the histogram inside the 4096-byte parameter block).
ANS_MAX_Q = 1000
#: Bits of each remainder modelled by the ANS coder; the rest are sent raw (they are ~uniform).
ANS_HI_BITS = 10
#: Floor on the remainder model's weights so every symbol stays codable (costs < 1e-6 bits/key).
ANS_MIN_WEIGHT = 1e-9


def _remainder_weights(ratio: float, size: int) -> np.ndarray:
    w = np.full(size, ratio, dtype=np.float64)
    w[0] = 1.0
    w = np.cumprod(w)  # sequential float64 products: bit-identical on every IEEE-754 machine
    return np.maximum(w, ANS_MIN_WEIGHT)


@register
class AnsIndexCodec(IndexCodec):
    name = "ans"
    codec_id = 11
    description = "gaps ANS-coded under a geometric model (exact, ~log2 C(n,k))"

    def encode(self, indices: np.ndarray, n: int, seed: int = 0) -> bytes:
        idx = check_indices(indices, n)
        k = idx.size
        if k == 0:
            return pack(self.codec_id, n, 0, b"", _ANS_PARAMS.pack(0, 0, 0, 1.0))
        gaps = np.diff(idx, prepend=-1) - 1
        b_min = 0
        while (int(gaps.max()) >> b_min) >= ANS_MAX_Q:
            b_min += 1
        b = max(best_rice_parameter(gaps, n), b_min)
        lo = max(0, b - ANS_HI_BITS)
        q = gaps >> b
        r = gaps & ((1 << b) - 1)
        hist = np.bincount(q, minlength=1).astype(np.uint32)
        ratio = min(1.0, max(float((1.0 - k / n) ** (1 << lo)), 1e-6))  # k = n gives 0: keep it codable
        raw = pack_fixed(r & ((1 << lo) - 1), lo)
        streams = []  # in the order the decoder reads them: quotients, then the remainders' high bits
        if hist.size > 1:
            streams.append((q, Categorical.of_histogram(hist)))
        if b - lo > 0:
            streams.append((r >> lo, Categorical(_remainder_weights(ratio, 1 << (b - lo)))))
        words = ans_write(streams)
        params = _ANS_PARAMS.pack(b, lo, hist.size, ratio) + hist.astype("<u4").tobytes()
        return pack(self.codec_id, n, k, raw + words, params)

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) < _ANS_PARAMS.size:
            raise CodecError(f"ans: parameter block has {len(c.params)} bytes, expected >= {_ANS_PARAMS.size}")
        b, lo, qsize, ratio = _ANS_PARAMS.unpack_from(c.params)
        k, n = c.count, c.n
        if k > n:
            raise CodecError(f"ans: {k} keys cannot fit in a universe of {n}")
        if k == 0:
            if c.payload or qsize:
                raise CodecError("ans: an empty set must have no histogram and no payload")
            return np.zeros(0, dtype=np.int64)
        check_decode_size(k, "ans")  # a constant gap sequence costs 0 payload bits: bound k itself
        if b > 40 or lo > b or b - lo > ANS_HI_BITS or not 1 <= qsize <= ANS_MAX_Q:
            raise CodecError(f"ans: parameters out of range (b={b}, lo={lo}, qsize={qsize})")
        if not (np.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise CodecError(f"ans: remainder model ratio {ratio} is not in (0, 1]")
        if len(c.params) != _ANS_PARAMS.size + 4 * qsize:
            raise CodecError(f"ans: parameter block has {len(c.params)} bytes, expected {_ANS_PARAMS.size + 4 * qsize}")
        hist = np.frombuffer(c.params, "<u4", qsize, _ANS_PARAMS.size).astype(np.int64)
        if int(hist.sum()) != k or hist[-1] == 0:
            raise CodecError(f"ans: quotient histogram sums to {int(hist.sum())}, header says {k} keys")
        rlen = (k * lo + 7) // 8
        rest = len(c.payload) - rlen
        if rest < 0 or rest % 4:
            raise CodecError(f"ans: payload of {len(c.payload)} bytes does not hold a {rlen}-byte raw stream "
                             "plus whole 32-bit ANS words")
        reader = AnsReader(np.frombuffer(c.payload, "<u4", rest // 4, rlen).astype(np.uint32), "ans")
        q = reader.read(Categorical.of_histogram(hist), k) if qsize > 1 else np.zeros(k, dtype=np.int64)
        rhi = (reader.read(Categorical(_remainder_weights(ratio, 1 << (b - lo))), k) if b - lo > 0
               else np.zeros(k, dtype=np.int64))
        reader.finish()
        gaps = (q << b) | (rhi << lo) | unpack_fixed(c.payload, k, lo)
        idx = np.cumsum(gaps + 1) - 1
        if idx[-1] >= n:
            raise CodecError(f"ans: decoded index {idx[-1]} is outside [0, {n})")
        if gaps.min() < 0 or idx[0] < 0 or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise CodecError("ans: decoded indices are not increasing within [0, n) (a gap overflowed): the payload is forged or corrupted")
        return idx

    def estimate_bits(self, k: int, n: int) -> float:
        return 8.0 * (40 + 12 + 4 * 24) + log2_binomial(n, k) + 32


# --- dense mask under a Bernoulli model ----------------------------------------------------------------

_BERN_PARAMS = struct.Struct("<d")
#: Default clip of the shared probabilities: far above constriction's 2^-24 resolution, and a bit
#: against the model costs at most log2(1/eps) ~ 20 bits.
BERNOULLI_EPS = 1e-6


@register
class BernoulliAnsCodec(MaskCodec):
    name = "bernoulli-ans"
    codec_id = 31
    needs_probs = True
    description = "dense mask ANS-coded under per-position Bernoulli(probs) (FedPM entropy-coded)"

    def __init__(self, eps: float = BERNOULLI_EPS) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.eps = eps

    @staticmethod
    def _model_probs(probs: np.ndarray | None, n: int, eps: float) -> np.ndarray:
        if probs is None:
            raise CodecError("bernoulli-ans needs the shared probabilities (probs=...) on both sides")
        p = np.asarray(probs, dtype=np.float64).ravel()
        if p.size != n:
            raise CodecError(f"bernoulli-ans: probs has {p.size} entries, the mask has {n}")
        if not np.isfinite(p).all():
            raise CodecError("bernoulli-ans: probs must be finite")
        return np.clip(p, eps, 1.0 - eps)

    def encode(self, mask: np.ndarray, probs: np.ndarray | None = None) -> bytes:
        m = np.asarray(mask).astype(bool, copy=False).ravel()
        p = self._model_probs(probs, m.size, self.eps)
        words = ans_write([(m, Bernoulli(p))]) if m.size else b""
        return pack(self.codec_id, m.size, int(m.sum()), words, _BERN_PARAMS.pack(self.eps))

    def decode(self, data: bytes, probs: np.ndarray | None = None, *, expect_n: int | None = None) -> np.ndarray:
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) != _BERN_PARAMS.size:
            raise CodecError(f"bernoulli-ans: parameter block has {len(c.params)} bytes, expected {_BERN_PARAMS.size}")
        (eps,) = _BERN_PARAMS.unpack(c.params)
        if not 0.0 < eps < 0.5:
            raise CodecError(f"bernoulli-ans: clip eps {eps} is not in (0, 0.5)")
        if c.count > c.n or len(c.payload) % 4:
            raise CodecError(f"bernoulli-ans: bad sizes (n={c.n}, ones={c.count}, {len(c.payload)} payload bytes)")
        p = self._model_probs(probs, c.n, eps)  # bounded by the caller's array, not by the header
        if c.n == 0:
            return np.zeros(0, dtype=bool)
        reader = AnsReader(c.payload, "bernoulli-ans")
        m = reader.read(Bernoulli(p), c.n).astype(bool)
        reader.finish("wrong probs, or a corrupted payload")
        if int(m.sum()) != c.count:
            raise CodecError(f"bernoulli-ans: decoded {int(m.sum())} ones, header says {c.count} (wrong probs?)")
        return m

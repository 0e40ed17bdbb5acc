"""``probs-counts-rans``: the exact keep-counts downlink, fast enough for foundation models (issue 13).

The same message as ``probs-counts`` (integer counts ``c_i in 0..K``, the receiver recomputes
``theta`` from them bit for bit), coded with our own 4-way interleaved rANS instead of constriction's
``Categorical`` ANS: constriction decodes ~14 ns per symbol (1.2 s for 86M weights on the 2-core
machine), this kernel a few ns, and it writes ``theta`` directly through the counts table, so a client
never holds an array of all the counts. Size is within ~0.1% of ``probs-counts`` (the model is the
empirical histogram quantized to 16 bits instead of constriction's 24).

Layout (little-endian; see docs/wire-format.md)::

    params  : K (u32, 1..1000), stat (u8: 0 mean, 1 mode), eps (f32), prior_a (f32), prior_b (f32),
              lanes (u8, = 4), precision (u8, = 16), hist (u32 x (K+1)), final states (u64 x lanes)
    payload : u32 words, read forward by the decoder

Model: ``freq = quantize_frequencies(hist)`` (below; integers summing to 2^16, every occurring count
at least 1, computed identically on both sides from the histogram in the header). Symbol ``i`` uses
lane ``i mod 4``; each lane is a 64-bit rANS state in [2^32, 2^64) renormalised by 32-bit words
(Duda 2013; the layout of Giesen's ryg_rans 64-bit coder, whose large state-to-precision ratio keeps
the coding loss negligible). Decoding symbol ``i`` from lane state ``x``: ``slot = x mod 2^16``, ``s``
= the symbol whose cumulative range holds ``slot``, ``x = freq[s] * (x >> 16) + slot - cum[s]``, then
if ``x < 2^32``: ``x = (x << 32) | next word``. After the last symbol every lane is back at 2^32 and
every word has been read; the decoded counts must match the histogram.
"""

from __future__ import annotations

import struct

import numpy as np

from ._jit import njit
from .base import register
from .container import CodecError, check_decode_size
from .dense import ProbsCountsCodec
from .entropy import EmpiricalCoder, histogram

PRECISION = 16
LANES = 4
_RANS_L = 1 << 32
_EXTRA = struct.Struct("<BB")  # lanes, precision


def quantize_frequencies(hist: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Integer frequencies summing to ``2^precision``: ``floor(h * 2^p / total)``, at least 1 for
    every symbol that occurs, the rounding remainder given to (or taken from) the largest ones."""
    h = np.asarray(hist, dtype=np.int64)
    m = 1 << precision
    total = int(h.sum())
    if total <= 0:
        return np.zeros(h.size, dtype=np.int64)
    if np.count_nonzero(h) > m:
        raise CodecError(f"more than 2^{precision} distinct symbols")
    f = np.where(h > 0, np.maximum(1, (h * m) // total), 0)
    diff = m - int(f.sum())
    order = np.argsort(-f, kind="stable")  # largest first, ties by symbol
    if diff >= 0:
        f[order[0]] += diff
    else:  # symbols forced up to 1 took more than the floor left: shave the largest, keeping each >= 1
        for j in order:
            take = min(-diff, int(f[j]) - 1)
            f[j] -= take
            diff += take
            if diff == 0:
                break
    return f


@njit(cache=True)
def _encode_kernel(sym, freq, cum, out):  # type: ignore[no-untyped-def]
    """Encode ``sym`` (reverse order, 4 lanes); words fill ``out`` from the end. Returns the index of
    the first word, or -1 when ``out`` is too small; the final states go into ``out_states``."""
    x0 = np.uint64(_RANS_L)
    x1 = np.uint64(_RANS_L)
    x2 = np.uint64(_RANS_L)
    x3 = np.uint64(_RANS_L)
    pos = out.size
    for i in range(sym.size - 1, -1, -1):
        s = sym[i]
        f = np.uint64(freq[s])
        lane = i & 3
        if lane == 0:
            x = x0
        elif lane == 1:
            x = x1
        elif lane == 2:
            x = x2
        else:
            x = x3
        if (x >> np.uint64(48)) >= f:  # x >= f * 2^48 (written so that f = 2^16 cannot overflow)
            if pos == 0:
                return -1, x0, x1, x2, x3
            pos -= 1
            out[pos] = np.uint32(x & np.uint64(0xFFFFFFFF))
            x >>= np.uint64(32)
        x = ((x // f) << np.uint64(16)) + (x % f) + np.uint64(cum[s])
        if lane == 0:
            x0 = x
        elif lane == 1:
            x1 = x
        elif lane == 2:
            x2 = x
        else:
            x3 = x
    return pos, x0, x1, x2, x3


@njit(cache=True)
def _decode_kernel(words, states, lut, freq, cum, table, out, hist):  # type: ignore[no-untyped-def]
    """Decode ``out.size`` symbols into ``out[i] = table[symbol]``, counting them in ``hist``.
    Returns 0, or -1 (ran out of words), -2 (a lane did not end at 2^32), -3 (words left over)."""
    x = np.empty(4, np.uint64)
    for j in range(4):
        x[j] = np.uint64(states[j])
    x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
    pos = 0
    nw = words.size
    mask = np.uint64(0xFFFF)
    low = np.uint64(_RANS_L)
    for i in range(out.size):
        lane = i & 3
        if lane == 0:
            xx = x0
        elif lane == 1:
            xx = x1
        elif lane == 2:
            xx = x2
        else:
            xx = x3
        slot = xx & mask
        s = lut[slot]
        xx = np.uint64(freq[s]) * (xx >> np.uint64(16)) + slot - np.uint64(cum[s])
        if xx < low:
            if pos >= nw:
                return -1
            xx = (xx << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        if lane == 0:
            x0 = xx
        elif lane == 1:
            x1 = xx
        elif lane == 2:
            x2 = xx
        else:
            x3 = xx
        out[i] = table[s]
        hist[s] += 1
    if x0 != low or x1 != low or x2 != low or x3 != low:
        return -2
    if pos != nw:
        return -3
    return 0


def _model(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(freq, cum, lut) as the kernels take them (uint32, uint32, uint16[2^16])."""
    freq = quantize_frequencies(hist)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint32)
    lut = np.repeat(np.arange(freq.size, dtype=np.uint16), freq) if freq.sum() else np.zeros(1 << PRECISION, np.uint16)
    return freq.astype(np.uint32), cum, lut


def rans_encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, tuple[int, ...], bytes]:
    """(histogram, final lane states, u32 words) of ``symbols`` in ``0..alphabet-1``."""
    sym = np.ascontiguousarray(np.asarray(symbols).ravel())
    if sym.dtype.kind not in "ui":
        raise CodecError(f"symbols must be integers, got {sym.dtype}")
    hist = histogram(sym, alphabet)
    freq, cum, _ = _model(hist)
    if sym.size == 0:
        return hist, (_RANS_L,) * LANES, b""
    # information content under the quantized model, plus slack: usually enough, else one word per symbol
    nz = hist > 0
    bits = float(np.sum(hist[nz] * (PRECISION - np.log2(freq[nz].astype(np.float64)))))
    for size in (int(bits / 32 * 1.01) + 64 * LANES, sym.size + LANES):
        out = np.empty(size, dtype=np.uint32)
        pos, *states = _encode_kernel(sym, freq, cum, out)
        if pos >= 0:
            return hist, tuple(int(s) for s in states), out[pos:].astype("<u4").tobytes()
    raise CodecError("rANS output buffer overflow (cannot happen: one word per symbol at most)")


def rans_decode(hist: np.ndarray, states: tuple[int, ...], payload: bytes, count: int, table: np.ndarray) -> np.ndarray:
    """``table[symbol]`` for each of the ``count`` decoded symbols (checked against ``hist``)."""
    if int(hist.sum()) != count:
        raise CodecError(f"histogram sums to {int(hist.sum())}, header says {count} symbols")
    check_decode_size(count, "rANS symbols")
    if len(payload) % 4:
        raise CodecError(f"rANS payload length {len(payload)} is not a multiple of 4")
    if len(states) != LANES or any(not _RANS_L <= s < 1 << 64 for s in states):
        raise CodecError("rANS lane states out of range: the payload is corrupted")
    freq, cum, lut = _model(hist)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    out = np.empty(count, dtype=table.dtype)
    seen = np.zeros(hist.size, dtype=np.int64)
    status = _decode_kernel(words, np.asarray(states, np.uint64), lut, freq, cum, table, out, seen)
    if status != 0:
        what = {-1: "ran out of words", -2: "lane states do not return to the start", -3: "trailing words"}[status]
        raise CodecError(f"rANS stream is corrupted ({what})")
    if not np.array_equal(seen, hist):
        raise CodecError("decoded counts do not match the histogram: the payload is corrupted")
    return out


class Rans4(EmpiricalCoder):
    """Our 4-lane interleaved rANS under the empirical histogram (16-bit model): params ``lanes, precision |
    histogram | final lane states``."""

    name = "rans4"
    head = _EXTRA.pack(LANES, PRECISION)
    side_size = 8 * LANES

    def encode(self, symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes, bytes]:
        hist, states, words = rans_encode(symbols, alphabet)
        return hist, struct.pack(f"<{LANES}Q", *states), words

    def decode(self, hist: np.ndarray, side: bytes, words: bytes, count: int, table: np.ndarray | None = None) -> np.ndarray:
        states = struct.unpack(f"<{LANES}Q", side)
        return rans_decode(hist, states, words, count, np.arange(hist.size, dtype=np.int64) if table is None else table)


RANS4 = Rans4()


@register
class ProbsCountsRansCodec(ProbsCountsCodec):
    """``probs-counts``' message (the same counts, statistic, eps and prior) through another coder."""

    name = "probs-counts-rans"
    codec_id = 53
    description = "integer keep-counts 0..K, 4-way interleaved rANS (numba; the fast exact downlink)"
    coder = RANS4


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for uint8 counts."""
    codec = ProbsCountsRansCodec()
    codec.decode(codec.encode(None, np.array([0, 1, 1, 2], np.uint8), 2))

"""Downlink coding at scale (issue 13): streamed in blocks, table look-ups, reconstruct without coding.

Each fast path is pinned against an independent slow one: the ANS bytes against one constriction
``encode_reverse`` of the whole array, the table against the posterior formula evaluated per element
in Python floats, ``reconstruct`` against an actual ``decode(encode(.))``.
"""

from __future__ import annotations

import constriction
import numpy as np
import pytest

from deltamask.codecs import CodecError, dense, entropy, get_codec
from deltamask.codecs.dense import ProbsCountsCodec, counts_table, theta_from_counts


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(dense, "CHUNK", 1000)  # many blocks on a small array
    monkeypatch.setattr(entropy, "CHUNK", 1000)
    return 1000


def _one_shot(symbols: np.ndarray, hist: np.ndarray) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    probs = hist.astype(np.float64) / float(hist.sum())
    coder.encode_reverse(symbols.astype(np.int32), constriction.stream.model.Categorical(probs, perfect=False))
    return coder.get_compressed().astype("<u4").tobytes()


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 4567])
def test_blocked_ans_equals_one_shot_encode(small_chunks: int, n: int) -> None:
    rng = np.random.default_rng(n)
    sym = rng.binomial(12, 0.3, n).astype(np.uint8)
    hist, body = entropy.ans_encode_symbols(sym, 13)
    np.testing.assert_array_equal(hist, np.bincount(sym, minlength=13))
    if np.count_nonzero(hist) > 1:
        assert body == _one_shot(sym, hist)
    np.testing.assert_array_equal(entropy.ans_decode_symbols(hist.astype(np.int64), body, n), sym)
    table = rng.random(13).astype(np.float32)
    np.testing.assert_array_equal(entropy.ans_decode_symbols(hist.astype(np.int64), body, n, table=table), table[sym])


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 4567])
def test_blocked_bernoulli_and_two_streams_equal_one_shot_constriction(small_chunks: int, n: int) -> None:
    # the coding layer's writer pushes in blocks; constriction's own one-shot calls must give the same words
    rng = np.random.default_rng(n)
    p = np.clip(rng.random(n), 1e-6, 1 - 1e-6)
    bits = (rng.random(n) < p).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(bits, constriction.stream.model.Bernoulli(perfect=False), p)
    assert entropy.ans_write([(bits, entropy.Bernoulli(p))]) == coder.get_compressed().astype("<u4").tobytes()
    q = rng.integers(0, 7, n)
    one = constriction.stream.stack.AnsCoder()
    one.encode_reverse(bits, constriction.stream.model.Bernoulli(perfect=False), p)  # the second stream first
    one.encode_reverse(q.astype(np.int32), constriction.stream.model.Categorical(np.bincount(q, minlength=7) / n, perfect=False))
    words = entropy.ans_write([(q, entropy.Categorical.of_histogram(np.bincount(q, minlength=7))), (bits, entropy.Bernoulli(p))])
    assert words == one.get_compressed().astype("<u4").tobytes()
    reader = entropy.AnsReader(words, "test")
    np.testing.assert_array_equal(reader.read(entropy.Categorical.of_histogram(np.bincount(q, minlength=7)), n), q)
    np.testing.assert_array_equal(reader.read(entropy.Bernoulli(p), n), bits)
    reader.finish()


def test_the_two_counts_codecs_are_one_message_through_two_coders() -> None:
    from deltamask.codecs.rans import RANS4, ProbsCountsRansCodec

    rng = np.random.default_rng(3)
    counts = rng.binomial(5, 0.7, 20_000).astype(np.uint8)
    a, b = ProbsCountsCodec("mode", 0.01), ProbsCountsRansCodec("mode", 0.01)
    assert a.coder is entropy.ANS_EMPIRICAL and b.coder is RANS4 and type(b).encode is type(a).encode  # no own coding
    pa, pb = a.encode(None, counts, 5), b.encode(None, counts, 5)
    assert pa != pb
    np.testing.assert_array_equal(a.decode(pa), b.decode(pb))
    np.testing.assert_array_equal(a.decode_counts(pa)[0], b.decode_counts(pb)[0])
    np.testing.assert_array_equal(b.decode_counts(pb)[0], counts)
    with pytest.raises(CodecError, match="layout"):  # one coder's params are not the other's
        RANS4.parse_params(entropy.ANS_EMPIRICAL.params(np.ones(6, np.int64), b"") + bytes(34), 6, "x")


def test_corrupted_stream_in_a_later_block_is_refused(small_chunks: int) -> None:
    rng = np.random.default_rng(0)
    sym = rng.integers(0, 5, 5000)
    hist, body = entropy.ans_encode_symbols(sym, 5)
    bad = bytearray(body)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(CodecError):
        entropy.ans_decode_symbols(hist.astype(np.int64), bytes(bad), 5000)
    with pytest.raises(CodecError, match="symbols must lie"):
        entropy.ans_encode_symbols(np.array([0, 7]), 5)


@pytest.mark.parametrize("stat", ["mean", "mode"])
@pytest.mark.parametrize("total", [1, 2, 10, 255, 1000])
def test_counts_table_equals_the_formula_per_element(stat: str, total: int) -> None:
    eps = 0.01
    table = counts_table(total, stat, eps)
    for c in range(total + 1):
        if stat == "mean":
            want = (1.0 + c) / (2.0 + total)
        else:
            want = c / total
        want = min(max(want, eps), 1.0 - eps)
        assert table[c] == np.float32(want), (c, table[c], want)
    counts = np.random.default_rng(total).integers(0, total + 1, 3000).astype(np.uint16)
    np.testing.assert_array_equal(theta_from_counts(counts, total, stat, eps), table[counts.astype(np.int64)])
    with pytest.raises(ValueError, match=f"0..{total}"):
        theta_from_counts(np.array([total + 1]), total)


@pytest.mark.parametrize("name", ["probs-f32", "probs-q8", "probs-counts"])
def test_reconstruct_equals_decode_of_encode(small_chunks: int, name: str) -> None:
    rng = np.random.default_rng(3)
    n, K = 4321, 7
    codec = ProbsCountsCodec("mode", 0.01) if name == "probs-counts" else get_codec(name, "probs")
    counts = rng.binomial(K, 0.6, n).astype(np.uint8)
    for theta in (theta_from_counts(counts, K, "mode", 0.01), rng.random(n).astype(np.float32),
                  np.array([0.0, 1.0, 0.5, 1 / 510], np.float32)):
        c = counts if theta.size == n else np.zeros(theta.size, np.uint8)
        want = codec.decode(codec.encode(theta, c, K))
        got = codec.reconstruct(theta, c, K)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- probs-counts-rans: our own rANS, pinned against a plain-Python coder written from the spec -----------

def _py_rans_encode(sym: list[int], freq: list[int]) -> tuple[list[int], list[int]]:
    """docs/wire-format.md's probs-counts-rans, symbol by symbol in Python integers (slow, obvious)."""
    cum = [sum(freq[:s]) for s in range(len(freq))]
    states, words = [1 << 32] * 4, []
    for i in reversed(range(len(sym))):
        s, x = sym[i], states[i % 4]
        if x >= freq[s] << 48:
            words.append(x & 0xFFFFFFFF)
            x >>= 32
        states[i % 4] = (x // freq[s] << 16) + x % freq[s] + cum[s]
    return states, words[::-1]


def _py_rans_decode(states: list[int], words: list[int], freq: list[int], n: int) -> list[int]:
    cum = [sum(freq[:s]) for s in range(len(freq))]
    states, out, pos = list(states), [], 0
    for i in range(n):
        x = states[i % 4]
        slot = x & 0xFFFF
        s = max(j for j in range(len(freq)) if freq[j] and cum[j] <= slot)
        x = freq[s] * (x >> 16) + slot - cum[s]
        if x < 1 << 32:
            x = x << 32 | words[pos]
            pos += 1
        states[i % 4] = x
        out.append(s)
    assert states == [1 << 32] * 4 and pos == len(words)
    return out


@pytest.mark.parametrize("n,total", [(1, 1), (7, 3), (500, 10), (3000, 255), (2000, 1000)])
def test_rans_matches_the_spec_written_in_python(n: int, total: int) -> None:
    import struct

    from deltamask.codecs.container import unpack
    from deltamask.codecs.rans import quantize_frequencies

    rng = np.random.default_rng(n + total)
    counts = np.where(rng.random(n) < 0.7, total, rng.integers(0, total + 1, n)).astype(np.uint16)
    codec = get_codec("probs-counts-rans", "probs")
    payload = codec.encode(None, counts, total)
    hist = np.bincount(counts, minlength=total + 1)
    freq = quantize_frequencies(hist)
    assert freq.sum() == 1 << 16 and ((freq > 0) == (hist > 0)).all()
    states, words = _py_rans_encode(counts.tolist(), freq.tolist())
    c = unpack(payload)
    assert list(struct.unpack_from("<4Q", c.params, len(c.params) - 32)) == states
    assert np.frombuffer(c.payload, "<u4").tolist() == words
    assert _py_rans_decode(states, words, freq.tolist(), n) == counts.tolist()
    np.testing.assert_array_equal(codec.decode_counts(payload)[0], counts)
    want = ProbsCountsCodec().decode(ProbsCountsCodec().encode(None, counts, total))
    np.testing.assert_array_equal(codec.decode(payload).view(np.uint32), want.view(np.uint32))


def test_rans_size_matches_constriction_and_refuses_corruption() -> None:
    rng = np.random.default_rng(1)
    n, K = 200_000, 10
    counts = np.where(rng.random(n) < 0.6, K, 0).astype(np.uint8)
    hit = rng.choice(n, 8000)
    counts[hit] = rng.integers(0, K + 1, hit.size)
    fast = get_codec("probs-counts-rans", "probs").encode(None, counts, K)
    slow = ProbsCountsCodec().encode(None, counts, K)
    assert abs(len(fast) - len(slow)) <= 64 + 0.001 * len(slow)  # the lane states, and ~0.1% at most
    codec = get_codec("probs-counts-rans", "probs")
    from deltamask.codecs.container import HEADER, unpack

    state_at = HEADER.size + len(unpack(fast).params) - 5  # inside the last lane state
    for pos in (len(fast) - 40, state_at):  # a payload word; a lane state (the CRC is fixed up)
        bad = bytearray(fast)
        bad[pos] ^= 0x5A
        import zlib

        bad[-4:] = zlib.crc32(bytes(bad[:-4])).to_bytes(4, "little")
        with pytest.raises(CodecError):
            codec.decode(bytes(bad))
    with pytest.raises(CodecError, match="0..10"):
        codec.encode(None, np.array([11], np.uint8), K)
    with pytest.raises(CodecError, match="needs integer counts"):
        codec.encode(None, None, None)

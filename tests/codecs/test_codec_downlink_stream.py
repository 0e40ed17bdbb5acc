"""Downlink coding at scale (issue 13): streamed in blocks, table look-ups, reconstruct without coding.

Each fast path is pinned against an independent slow one: the ANS bytes against one constriction
``encode_reverse`` of the whole array, the table against the posterior formula evaluated per element
in Python floats, ``reconstruct`` against an actual ``decode(encode(.))``.
"""

from __future__ import annotations

import constriction
import numpy as np
import pytest

from deltamask.codecs import CodecError, get_codec
from deltamask.codecs import dense
from deltamask.codecs.dense import ProbsCountsCodec, counts_table, theta_from_counts


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(dense, "CHUNK", 1000)  # many blocks on a small array
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
    hist, body = dense.ans_encode_symbols(sym, 13)
    np.testing.assert_array_equal(hist, np.bincount(sym, minlength=13))
    if np.count_nonzero(hist) > 1:
        assert body == _one_shot(sym, hist)
    np.testing.assert_array_equal(dense.ans_decode_symbols(hist.astype(np.int64), body, n), sym)
    table = rng.random(13).astype(np.float32)
    np.testing.assert_array_equal(dense.ans_decode_symbols(hist.astype(np.int64), body, n, table=table), table[sym])


def test_corrupted_stream_in_a_later_block_is_refused(small_chunks: int) -> None:
    rng = np.random.default_rng(0)
    sym = rng.integers(0, 5, 5000)
    hist, body = dense.ans_encode_symbols(sym, 5)
    bad = bytearray(body)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(CodecError):
        dense.ans_decode_symbols(hist.astype(np.int64), bytes(bad), 5000)
    with pytest.raises(CodecError, match="symbols must lie"):
        dense.ans_encode_symbols(np.array([0, 7]), 5)


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

"""Exact codecs: lossless, within 1.5% of log2 C(N, k) at N = 86M; auto; Bernoulli mask; downlink."""

from __future__ import annotations

import numpy as np
import pytest

from deltamask.codecs import CodecError, codec_of, get_codec, log2_binomial
from deltamask.codecs.auto import AutoCodec

N = 86_000_000


@pytest.fixture(scope="module")
def sets() -> dict[float, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for f in (0.001, 0.005, 0.01, 0.05):  # ~k uniform distinct indices (faster than choice without replacement)
        x = np.sort(rng.integers(0, N, int(N * f)))
        out[f] = x[np.concatenate([[True], x[1:] != x[:-1]])]
    return out


@pytest.mark.parametrize("name", ["golomb", "ans"])
def test_within_1p5_percent_of_bound(name: str, sets: dict[float, np.ndarray]) -> None:
    codec = get_codec(name, "indices")
    for frac, idx in sets.items():
        data = codec.encode(idx, N)
        bound = log2_binomial(N, idx.size)
        assert 8 * len(data) <= 1.015 * bound, (frac, 8 * len(data) / bound)
        assert np.array_equal(codec.decode(data), idx)


def test_ans_adversarial_sets() -> None:
    """Clustered sets, huge gaps and the full universe stay lossless."""
    codec = get_codec("ans")
    cases = [(np.array([0, 2**35]), 2**36), (np.concatenate([np.arange(1000), 10**9 + np.arange(1000)]), 2**31),
             (np.arange(5000), 5000), (np.array([7]), 8)]
    for idx, n in cases:
        assert np.array_equal(codec.decode(codec.encode(idx, n)), idx)


def test_auto_budget() -> None:
    rng = np.random.default_rng(0)
    n = 2_000_000
    small = np.sort(rng.choice(n, 200, replace=False))  # 0.01%: a filter would be smaller than exact
    exact = get_codec("auto")
    assert exact.max_false_positives == 0 and not exact.lossy
    p = exact.encode(small, n)
    assert codec_of(p).name in ("ans", "golomb") and not codec_of(p).lossy
    assert np.array_equal(exact.decode(p), small)
    loose = AutoCodec(max_false_positives=1e9)
    p2 = loose.encode(small, n)
    assert codec_of(p2).name.startswith("fuse") and len(p2) < len(p)
    assert np.isin(small, loose.decode(p2)).all()
    per_key = AutoCodec(max_false_positives=0.5, per_key=True)  # fuse16: 30 FP for 200 keys, fuse8 7.8k
    assert codec_of(per_key.encode(small, n)).name in ("fuse16", "fuse16-4w", "ans", "golomb")
    # the chosen payload is the smallest of the admissible candidates
    sizes = {c: len(get_codec(c).encode(small, n)) for c in ("ans", "golomb")}
    assert len(p) == min(sizes.values())
    with pytest.raises(CodecError):
        AutoCodec(candidates=["fuse8"]).encode(small, n)
    with pytest.raises(CodecError):
        exact.decode(get_codec("bitpack").encode(np.ones(3, bool)))


def test_bernoulli_ans() -> None:
    codec = get_codec("bernoulli-ans", "mask")
    rng = np.random.default_rng(1)
    n = 200_000
    probs = rng.beta(0.3, 0.3, n)
    mask = rng.random(n) < probs
    data = codec.encode(mask, probs)
    assert np.array_equal(codec.decode(data, probs), mask)
    pc = np.clip(probs, 1e-6, 1 - 1e-6)
    entropy = -np.sum(np.where(mask, np.log2(pc), np.log2(1 - pc)))
    assert 8 * len(data) <= entropy * 1.01 + 8 * 100
    with pytest.raises(CodecError, match="needs"):
        codec.decode(data)
    with pytest.raises(CodecError):
        codec.decode(data, probs[:-1])
    wrong = 1 - probs
    try:
        got = codec.decode(data, wrong)
    except CodecError:
        pass
    else:
        assert not np.array_equal(got, mask)


def test_downlink_q8_error_and_size() -> None:
    """probs-q8: |error| <= 1/510 (+ float32 rounding); probs-counts: exact; both far below 32 bpp."""
    from deltamask.codecs.dense import theta_from_counts

    rng = np.random.default_rng(2)
    n, K = 500_000, 10
    counts = rng.binomial(K, 0.5, n)
    theta = theta_from_counts(counts, K)
    q8 = get_codec("probs-q8")
    d = q8.encode(theta)
    assert np.max(np.abs(q8.decode(d) - theta)) <= 1 / 510 + 1e-7
    assert 8 * len(d) / n < 4
    cont = rng.random(n).astype(np.float32)
    assert np.max(np.abs(q8.decode(q8.encode(cont)) - cont)) <= 1 / 510 + 1e-7
    pc = get_codec("probs-counts")
    d2 = pc.encode(theta, counts=counts, total=K)
    assert np.array_equal(pc.decode(d2), theta)  # bit-exact: the receiver recomputes theta
    assert 8 * len(d2) / n < 4
    with pytest.raises(CodecError):
        q8.encode(np.array([0.5, 1.5]))
    with pytest.raises(CodecError):
        pc.encode(theta)

"""Binary fuse filters: no false negatives, false-positive rate, backends agree, layout, image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask.codecs import CodecError, get_codec
from deltamask.codecs import fuse
from deltamask.codecs.fuse import FuseLayout, build_fuse_filter, fuse_layout

FILTERS = ["fuse8", "fuse16", "fuse8-4w", "fuse16-4w"]


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.integers(0, 2**40), max_size=300), arity=st.sampled_from([3, 4]),
       bits=st.sampled_from([8, 16]), seed=st.integers(0, 2**64 - 1))
def test_no_false_negatives(keys: list[int], arity: int, bits: int, seed: int) -> None:
    f = build_fuse_filter(np.array(keys, dtype=np.int64), arity, bits, seed)
    k = np.array(keys, dtype=np.uint64)
    assert f.contains(k).all()
    assert f.contains(k, backend="numpy").all()


@pytest.mark.parametrize("arity", [3, 4])
@pytest.mark.parametrize("bits", [8, 16])
def test_false_positive_rate_within_4_sigma(arity: int, bits: int) -> None:
    """Measured FP rate over 2M non-keys (4M for 16-bit) is within 4 sigma of 2^-bits."""
    rng = np.random.default_rng(arity * 100 + bits)
    n_keys = 200_000
    universe = 1 << 30
    keys = rng.choice(universe, n_keys, replace=False)
    f = build_fuse_filter(keys, arity, bits, seed=11)
    m = 2_000_000 if bits == 8 else 8_000_000
    probe = universe + np.arange(m, dtype=np.uint64)  # disjoint from the keys
    fp = int(f.contains(probe).sum())
    p = 2.0 ** -bits
    sigma = math.sqrt(m * p * (1 - p))
    assert abs(fp - m * p) <= 4 * sigma, (fp, m * p, sigma)


@pytest.mark.parametrize("arity", [3, 4])
def test_backends_agree(arity: int) -> None:
    """numba, numpy and torch (CPU tensors) answer identically, keys and query-all."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(arity)
    n = 100_000
    for bits in (8, 16):
        keys = np.sort(rng.choice(n, 1000, replace=False))
        f = build_fuse_filter(keys, arity, bits, seed=3)
        a = f.query_range(n, backend="numba")
        b = f.query_range(n, backend="numpy")
        c = f.query_range_torch(n, "cpu", chunk=1 << 17).numpy()
        assert np.array_equal(a, b) and np.array_equal(a, c)
        assert a[keys].all()
        big = rng.integers(0, 2**63, 5_000, dtype=np.int64)  # large keys exercise the wrap/sign paths
        t = f.contains_torch(torch.from_numpy(big)).numpy()
        assert np.array_equal(t, f.contains(big.astype(np.uint64)))
        assert np.array_equal(t, f.contains(big.astype(np.uint64), backend="numpy"))


@pytest.mark.gpu
def test_torch_cuda_matches_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    keys = np.sort(np.random.default_rng(0).choice(1_000_000, 10_000, replace=False))
    for arity in (3, 4):
        f = build_fuse_filter(keys, arity, 8)
        assert np.array_equal(f.query_range_torch(1_000_000, "cuda").cpu().numpy(), f.query_range(1_000_000))


def test_layout_matches_paper_sizes() -> None:
    """Bits per key at 10^6 keys (Graf & Lemire 2022, Table 3 / REFERENCE.md)."""
    for arity, bits, most in ((3, 8, 9.1), (4, 8, 8.7), (3, 16, 18.1), (4, 16, 17.3)):
        lay = fuse_layout(1_000_000, arity)
        assert lay.array_length * bits / 1e6 <= most
    assert fuse_layout(0, 3) == FuseLayout(3, 4, 1)
    for k in (0, 1, 2, 3, 10, 100, 10**4, 10**7, 3 * 10**7):
        for arity in (3, 4):
            lay = fuse_layout(k, arity)
            assert lay.segment_length & (lay.segment_length - 1) == 0
            assert lay.array_length >= k


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 17, 100, 1000])
@pytest.mark.parametrize("arity", [3, 4])
def test_small_and_empty_sets(k: int, arity: int) -> None:
    keys = np.arange(k) * 7919
    for seed in range(5):
        f = build_fuse_filter(keys, arity, 8, seed)
        assert f.contains(keys.astype(np.uint64)).all()


def test_duplicates_and_retry_path(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = np.array([5, 5, 5, 9, 9, 1])
    f = build_fuse_filter(keys, 3, 8)
    assert f.contains(np.array([1, 5, 9], np.uint64)).all()
    # force every nominal attempt to fail: construction still succeeds on a grown array
    real = fuse._peel
    calls = {"n": 0}

    def flaky(*a):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return -1 if calls["n"] <= fuse.NOMINAL_ATTEMPTS else real(*a)

    monkeypatch.setattr(fuse, "_peel", flaky)
    keys = np.arange(0, 50_000, 3)
    f = build_fuse_filter(keys, 3, 8)
    assert f.layout.segment_count > fuse_layout(keys.size, 3).segment_count
    assert f.contains(keys.astype(np.uint64)).all()
    data = get_codec("fuse8").encode(keys, 50_000)  # a grown layout is still a valid payload
    assert get_codec("fuse8").decode_mask(data)[keys].all()
    monkeypatch.setattr(fuse, "_peel", lambda *a: -1)
    with pytest.raises(CodecError, match="failed after"):
        build_fuse_filter(keys, 3, 8)


@pytest.mark.parametrize("name", FILTERS)
def test_codec_fp_and_estimate(name: str) -> None:
    codec = get_codec(name, "indices")
    n = 1_000_000
    keys = np.sort(np.random.default_rng(5).choice(n, 10_000, replace=False))
    data = codec.encode(keys, n, seed=9)
    assert codec.estimate_bits(keys.size, n) == 8 * len(data)
    got = codec.decode(data)
    assert np.isin(keys, got).all()
    fp = got.size - keys.size
    exp = codec.expected_false_positives(keys.size, n)
    assert abs(fp - exp) <= 4 * math.sqrt(exp) + 1
    info = codec.inspect(data)
    assert info["arity"] == codec.arity and info["fingerprint_bits"] == codec.fp_bits


@pytest.mark.parametrize("name", FILTERS)
def test_png_roundtrip(name: str) -> None:
    from PIL import Image
    import io

    from deltamask.codecs.image import image_shape, payload_to_png, png_report, png_to_payload

    codec = get_codec(name)
    for k in (1, 40, 5000):
        data = codec.encode(np.arange(k) * 13, 100_000, seed=k)
        png = payload_to_png(data)
        assert png_to_payload(png) == data
        im = Image.open(io.BytesIO(png))
        f, _, _ = codec.filter_of(data)
        h, w = image_shape(f.layout.array_length)
        assert im.size == (w, h) and abs(w - h) <= 1
        assert ("16" in im.mode) == (codec.fp_bits == 16)
    rep = png_report(data)
    assert rep["raw_bytes"] == len(data) and rep["png_bytes"] > 0


def test_png_rejects_garbage() -> None:
    from deltamask.codecs.image import payload_to_png, png_to_payload

    with pytest.raises(CodecError):
        png_to_payload(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CodecError):
        payload_to_png(get_codec("golomb").encode(np.array([1]), 10))
    png = payload_to_png(get_codec("fuse8").encode(np.arange(100), 1000))
    with pytest.raises(CodecError):
        png_to_payload(png[:-30])

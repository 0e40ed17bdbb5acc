"""Round trips and golden payloads for every registered codec (parametrized over the registry)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _samples import GOLDEN_N, encode_sample, golden_input
from make_golden import GOLDEN, regenerate

from deltamask.codecs import CodecError, available_codecs, codec_for_id, codec_of, get_codec
from deltamask.codecs.container import pack, unpack

ALL = available_codecs()
INDEX = available_codecs("indices")
WRITERS = [n for n in ALL if n != "auto"]  # auto writes another codec's container


def _index_sets(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        np.zeros(0, dtype=np.int64),
        np.array([0]),
        np.array([n - 1]),
        np.array([0, n - 1]),
        np.arange(n),  # every index
        np.arange(0, n, 2),
        np.sort(rng.choice(n, n // 100, replace=False)),
        np.sort(rng.choice(n, n // 3, replace=False)),
    ]


@pytest.mark.parametrize("name", INDEX)
@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
def test_index_roundtrip(name: str, n: int) -> None:
    codec = get_codec(name, "indices")
    for idx in _index_sets(n):
        idx = np.unique(idx)
        data = codec.encode(idx, n)
        got = codec.decode(data)
        mask = codec.decode_mask(data)
        assert mask.shape == (n,) and mask.dtype == bool
        assert np.array_equal(np.flatnonzero(mask), got)
        if codec.lossy or name == "auto" and codec_of(data).lossy:
            assert np.isin(idx, got).all(), "false negative"
        else:
            assert np.array_equal(got, idx)
        assert unpack(data).count == idx.size
        assert codec_of(data).codec_id == unpack(data).codec_id


@pytest.mark.parametrize("name", INDEX)
def test_index_input_normalised(name: str) -> None:
    """Unsorted input with duplicates encodes the same set as its sorted unique version."""
    codec = get_codec(name, "indices")
    idx = np.array([9, 3, 3, 500, 9, 0])
    assert codec.encode(idx, 1000, seed=1) == codec.encode(np.unique(idx), 1000, seed=1)
    with pytest.raises(CodecError):
        codec.encode(np.array([1000]), 1000)
    with pytest.raises(CodecError):
        codec.encode(np.array([-1]), 1000)
    with pytest.raises(CodecError):
        codec.encode(np.array([0.5]), 1000)


@pytest.mark.parametrize("name", available_codecs("mask"))
def test_mask_roundtrip(name: str) -> None:
    codec = get_codec(name, "mask")
    rng = np.random.default_rng(2)
    for n in (0, 1, 9, 10_000):
        probs = rng.uniform(0, 1, n)
        probs[: n // 10] = 0.0  # extreme probabilities are clipped, not fatal
        probs[n // 10 : n // 5] = 1.0
        mask = rng.random(n) < 0.5
        data = codec.encode(mask, probs)
        assert np.array_equal(codec.decode(data, probs), mask)


@pytest.mark.parametrize("name", available_codecs("array"))
def test_array_roundtrip(name: str) -> None:
    codec = get_codec(name, "array")
    if codec.lossy or name == "i64":  # compressors: statistics and sizes are tested in tests/methods
        a = golden_input(codec)["array"]
        got = codec.decode(codec.encode(a))
        assert got.shape == a.shape and np.isfinite(got).all()
        return
    for a in (np.zeros((0,), np.float32), np.float32(3.5) * np.ones(()), np.arange(24, dtype=np.float32).reshape(2, 3, 4)):
        got = codec.decode(codec.encode(a))
        assert got.shape == a.shape
        np.testing.assert_allclose(got, a, rtol=1e-3)


@pytest.mark.parametrize("name", available_codecs("probs"))
def test_probs_roundtrip(name: str) -> None:
    from deltamask.codecs.dense import theta_from_counts

    codec = get_codec(name, "probs")
    rng = np.random.default_rng(3)
    for n, K in ((0, 3), (1, 1), (5000, 10)):
        counts = rng.binomial(K, 0.3, n)
        theta = theta_from_counts(counts, K)
        got = codec.decode(codec.encode(theta, counts=counts, total=K))
        assert got.dtype == np.float32 and got.shape == (n,)
        tol = {"probs-q8": 1 / 510 + 1e-6}.get(name, 0.0)
        assert np.max(np.abs(got - theta), initial=0.0) <= tol


def test_registry_loud_lookups() -> None:
    with pytest.raises(KeyError, match="valid: .*fuse8"):
        get_codec("fuse9")
    with pytest.raises(KeyError):
        get_codec("bitpack", "indices")
    with pytest.raises(CodecError):
        codec_for_id(250)
    ids = [get_codec(n).codec_id for n in ALL]
    assert len(set(ids)) == len(ids)
    for n in ALL:
        c = get_codec(n)
        cid = c.codec_id
        assert (1 <= cid <= 9) == n.startswith("fuse"), n


@pytest.mark.parametrize("name", WRITERS)
def test_golden_payload(name: str) -> None:
    """Encoding the fixed sample reproduces the stored bytes; a format change must be deliberate.

    Regenerate with ``DELTAMASK_REGEN_GOLDEN=1`` or ``python tests/codecs/make_golden.py``.
    """
    if os.environ.get("DELTAMASK_REGEN_GOLDEN"):
        regenerate()
    path = GOLDEN / f"{name}.bin"
    assert path.exists(), f"no golden file for codec {name!r}: run tests/codecs/make_golden.py"
    golden = path.read_bytes()
    assert encode_sample(name) == golden, f"{name}: wire format changed (see make_golden.py)"
    codec = get_codec(name)
    kw = golden_input(codec)
    if codec.kind == "indices":
        got = codec.decode(golden)
        assert np.isin(kw["indices"], got).all()
        if not codec.lossy:
            assert np.array_equal(got, kw["indices"])
        assert codec.decode_mask(golden).shape == (GOLDEN_N,)
    elif codec.kind == "mask":
        assert np.array_equal(codec.decode(golden, kw["probs"]), kw["mask"])
    elif codec.kind == "array" and (codec.lossy or name == "i64"):
        assert codec.decode(golden).shape == kw["array"].shape
        if name == "i64":
            assert np.array_equal(codec.decode(golden), kw["array"])
    elif codec.kind == "array":
        np.testing.assert_allclose(codec.decode(golden), kw["array"], rtol=1e-3)
    elif codec.kind == "delta":
        got = codec.cond_levels(codec.decode(golden), kw["levels_v"], kw["total_v"])
        assert np.array_equal(got, kw["levels_t"])
    else:
        assert np.max(np.abs(codec.decode(golden) - kw["theta"])) <= 1 / 510 + 1e-6


@pytest.mark.parametrize("name", WRITERS)
def test_wrong_codec_rejected(name: str) -> None:
    """A payload handed to another codec's decoder is refused with CodecError."""
    data = (GOLDEN / f"{name}.bin").read_bytes()
    other = get_codec("golomb" if name != "golomb" else "ans")
    with pytest.raises(CodecError, match="codec id"):
        other.decode(data)


def test_size_claims_rejected_before_allocation() -> None:
    """Headers claiming 10^12 keys or positions are rejected, not attempted (valid CRC)."""
    for n, count in ((10**12, 5), (1000, 10**12), (10**12, 10**12)):
        data = _forge(1, n, count, b"", b"")
        with pytest.raises(CodecError, match="above the limit"):
            unpack(data)
        for name in INDEX:
            with pytest.raises(CodecError):
                get_codec(name).decode(data)
    # below MAX_N but above the decode limit: a constant-histogram q8 payload claiming 2^35 values
    hist = np.zeros(256, "<u4")
    data = _forge(get_codec("probs-q8").codec_id, 1 << 35, 1 << 35, hist.tobytes(), b"")
    with pytest.raises(CodecError):
        get_codec("probs-q8").decode(data)
    f8 = get_codec("fuse8")
    small = unpack(f8.encode(np.array([1, 2]), 10))
    big = _forge(1, 1 << 35, 2, small.params, small.payload)
    with pytest.raises(CodecError, match="decode limit"):
        f8.decode_mask(big)


def _forge(codec_id: int, n: int, count: int, params: bytes, payload: bytes) -> bytes:
    """A container with arbitrary (even out-of-range) header fields and a valid CRC."""
    import struct
    import zlib

    from deltamask.codecs.container import HEADER, MAGIC

    body = HEADER.pack(MAGIC, 1, codec_id, 0, n, count, len(params), len(payload)) + params + payload
    return body + struct.pack("<I", zlib.crc32(body))


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(CodecError):
        pack(1, 10**12, 0, b"")


def test_every_codec_subclasses_its_kinds_contract_and_register_refuses_one_that_does_not() -> None:
    from deltamask.codecs import KIND_CONTRACTS, Codec, available_codecs, register
    from deltamask.codecs.base import _REGISTRY

    for name in available_codecs():
        cls = _REGISTRY[name]
        assert issubclass(cls, KIND_CONTRACTS[cls.kind]), name
    assert "encode" not in vars(Codec) and "decode" not in vars(Codec)  # the signatures live in the contracts

    class Loose(Codec):  # an index codec that skipped IndexCodec: its encode(indices, n, seed) is nowhere declared
        name, codec_id, kind = "loose", 254, "indices"

        def encode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return b""

    with pytest.raises(TypeError, match="must subclass IndexCodec"):
        register(Loose)
    assert "loose" not in available_codecs()


def test_an_index_codec_must_state_its_expected_size() -> None:
    # auto tries only the candidates whose estimate is near the smallest: a codec inheriting an optimistic default
    # (the information bound) would be chosen over smaller ones, so the contract has no default
    from deltamask.codecs import IndexCodec

    class NoEstimate(IndexCodec):
        name, codec_id = "no-estimate", 253

        def encode(self, indices, n, seed=0):  # type: ignore[no-untyped-def]
            return b""

        def decode(self, data, *, expect_n=None):  # type: ignore[no-untyped-def]
            return np.zeros(0, np.int64)

    with pytest.raises(TypeError, match="estimate_bits"):
        NoEstimate()

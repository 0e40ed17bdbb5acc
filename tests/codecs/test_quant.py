"""The baselines' compressors: round trips, statistical properties, exact wire sizes, malformed input."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from deltamask.codecs import CodecError, codec_of, get_codec
from deltamask.codecs.container import pack, unpack
from deltamask.codecs.quant import (
    MIN_BLOCK,
    DriveCodec,
    EdenCodec,
    Int64Codec,
    QSGDCodec,
    Rotation,
    SignCodec,
    TopKCodec,
    block_sizes,
    lloyd_max_normal,
    wire_bytes,
)

SIZES = [1, 7, 255, 256, 1000, 70_000]


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3, size=n).astype(np.float32)  # heavy tails


def _unbiased(estimates: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(squared error of the mean estimate, its expectation if unbiased: mean MSE / T)."""
    mean = estimates.mean(0)
    mse = float(((estimates - x) ** 2).sum(1).mean())
    return float(((mean - x) ** 2).sum()), mse / len(estimates)


# --- structure -----------------------------------------------------------------------------------------

def test_registered_with_ids_60_to_99() -> None:
    for name in ("qsgd", "sign1", "topk", "drive", "eden", "i64"):
        c = get_codec(name, kind="array")
        assert 60 <= c.codec_id <= 99


def test_lloyd_max_centroids_match_max_1960() -> None:
    np.testing.assert_allclose(lloyd_max_normal(1), [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], atol=1e-6)
    np.testing.assert_allclose(lloyd_max_normal(2), [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)


@pytest.mark.parametrize("n", [1, 255, 256, 300, 65536 + 1000, 200_000])
def test_rotation_blocks_and_orthonormality(n: int) -> None:
    sizes = block_sizes(n, 1 << 16)
    assert all(s & (s - 1) == 0 and MIN_BLOCK <= s <= 1 << 16 for s in sizes)
    assert n <= sum(sizes) < n + MIN_BLOCK
    x = _x(n).astype(np.float64)
    rot = Rotation(n, 1 << 16, seed=5)
    z = rot.rotate(x)
    assert np.linalg.norm(z) == pytest.approx(np.linalg.norm(x), rel=1e-9)
    np.testing.assert_allclose(rot.unrotate(z), x, atol=1e-9)
    with pytest.raises(CodecError):
        block_sizes(n, 1000)


# --- round trips and properties --------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_sign_round_trip_and_agreement(n: int) -> None:
    x = _x(n)
    data = SignCodec().encode(x)
    y = codec_of(data).decode(data, expect_n=n)
    signs, scale = SignCodec().decode_signs(data)
    assert scale == pytest.approx(float(np.abs(x).mean()), rel=1e-6)
    nz = x != 0
    assert np.array_equal(np.sign(y[nz]), np.sign(x[nz]))
    assert np.array_equal(signs[nz], np.sign(x[nz]).astype(np.int8))
    assert len(data) == wire_bytes("sign1", n)


@pytest.mark.parametrize("n", SIZES)
def test_topk_keeps_exactly_the_largest_values(n: int) -> None:
    x = _x(n, 1)
    codec = TopKCodec(0.05)
    k = codec.k_for(n)
    data = codec.encode(x)
    y = codec_of(data).decode(data, expect_n=n)
    kept = np.flatnonzero(y)
    assert kept.size == k
    thresh = np.sort(np.abs(x))[::-1][k - 1]
    assert np.all(np.abs(x[kept]) >= thresh)
    np.testing.assert_array_equal(y[kept], x[kept].astype(np.float16).astype(np.float32))
    g = unpack(data).params
    (glen,) = struct.unpack("<I", g)
    assert len(data) == wire_bytes("topk", n, g=glen, k=k)


@pytest.mark.parametrize("levels,bucket", [(1, 0), (4, 128), (16, 512)])
def test_qsgd_round_trip_size_and_entropy(levels: int, bucket: int) -> None:
    n = 5000
    x = _x(n, 2)
    codec = QSGDCodec(levels, bucket)
    data = codec.encode(x, seed=9)
    norms, q = codec.quantize(x, np.random.default_rng(9))
    y = codec_of(data).decode(data, expect_n=n)
    b = bucket or n
    nb = -(-n // b)
    expected = (np.concatenate([q, np.zeros(nb * b - n)]).reshape(nb, b) * norms[:, None].astype(np.float64) / levels).ravel()[:n]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    c = unpack(data)
    words = (len(c.payload) - 4 * nb - 4 * (2 * levels + 1)) // 4
    assert len(data) == wire_bytes("qsgd", n, levels=levels, bucket=bucket, words=words)
    # ANS lands within a few words of the empirical entropy of the levels
    p = np.bincount(q + levels) / n
    entropy_bits = -n * float(np.sum(p[p > 0] * np.log2(p[p > 0])))
    assert 32 * words <= entropy_bits + 96


def test_qsgd_is_unbiased() -> None:
    x = _x(256, 3)
    codec = QSGDCodec(2, 64)
    est = []
    for t in range(3000):
        norms, q = codec.quantize(x, np.random.default_rng(t))
        est.append((q.reshape(4, 64) * norms[:, None].astype(np.float64) / 2).ravel())
    err, expect = _unbiased(np.array(est), x)
    assert err < 3 * expect


def _estimates(codec, x: np.ndarray, trials: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.array([codec.decode(codec.encode(x, seed=t)) for t in range(trials)], dtype=np.float64)


@pytest.mark.parametrize("codec", [DriveCodec(unbiased=True), EdenCodec(bits=2), EdenCodec(bits=0.5)], ids=["drive", "eden2", "eden0.5"])
def test_rotation_codecs_are_unbiased(codec) -> None:  # type: ignore[no-untyped-def]
    x = _x(300, 4)  # two rotation blocks (256 + padded 256)
    est = _estimates(codec, x, 1500)
    err, expect = _unbiased(est, x)
    assert err < 3 * expect, (err, expect)


def test_drive_mse_scale_has_lower_error_but_unbiased_mean_is_closer() -> None:
    x = _x(256, 5)
    ub, mse = _estimates(DriveCodec(True), x, 400), _estimates(DriveCodec(False), x, 400)
    assert ((mse - x) ** 2).sum(1).mean() < ((ub - x) ** 2).sum(1).mean()
    assert ((ub.mean(0) - x) ** 2).sum() < ((mse.mean(0) - x) ** 2).sum()


def test_eden_one_bit_is_drive_unbiased() -> None:
    x = _x(3000, 6)
    a = DriveCodec(True).decode(DriveCodec(True).encode(x, seed=11))
    b = EdenCodec(1).decode(EdenCodec(1).encode(x, seed=11))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [0.25, 0.5, 1, 2, 4])
def test_rotation_codecs_wire_size(n: int, bits: float) -> None:
    x = _x(n, 7)
    for block in (0, 1 << 16):
        e = EdenCodec(bits, block).encode(x, seed=1)
        assert len(e) == wire_bytes("eden", n, bits=bits, block=block)
        assert codec_of(e).decode(e, expect_n=n).shape == (n,)
        d = DriveCodec(True, block).encode(x, seed=1)
        assert len(d) == wire_bytes("drive", n, block=block)
    if n >= 70_000:  # blocked rotation: bits per coordinate close to the nominal budget
        assert 8 * len(e) / n == pytest.approx(bits, abs=0.02)


def test_zero_vector_is_exact_everywhere() -> None:
    z = np.zeros(500, np.float32)
    for codec, kw in ((QSGDCodec(), {"seed": 1}), (SignCodec(), {}), (TopKCodec(), {}), (DriveCodec(), {"seed": 1}), (EdenCodec(0.5), {"seed": 1})):
        data = codec.encode(z, **kw)
        y = codec_of(data).decode(data)
        assert np.array_equal(y, z) or codec.name == "sign1" and np.all(y == 0)


def test_non_finite_input_is_refused_with_advice() -> None:
    x = np.array([1.0, np.nan], np.float32)
    for codec in (QSGDCodec(), SignCodec(), TopKCodec(), DriveCodec(), EdenCodec()):
        with pytest.raises(CodecError, match="NaN"):
            codec.encode(x)


# --- malformed payloads ---------------------------------------------------------------------------------

def _valid_payloads() -> list[bytes]:
    x = _x(1000, 8)
    return [
        QSGDCodec().encode(x, seed=1),
        SignCodec().encode(x),
        TopKCodec(0.05).encode(x),
        DriveCodec().encode(x, seed=1),
        EdenCodec(0.5).encode(x, seed=1),
        EdenCodec(2).encode(x, seed=1),
        Int64Codec().encode(np.arange(5)),
    ]


@pytest.mark.parametrize("i", range(7))
def test_truncated_flipped_or_wrong_length_payloads_raise(i: int) -> None:
    data = _valid_payloads()[i]
    codec = codec_of(data)
    for bad in (data[:-1], data[:20], data + b"\0", bytes([data[0] ^ 1]) + data[1:], data[:50] + bytes([data[50] ^ 0x10]) + data[51:]):
        with pytest.raises(CodecError):
            codec.decode(bad)
    if codec.name != "i64":
        with pytest.raises(CodecError, match="receiver expects n=999"):
            codec.decode(data, expect_n=999)


def _repack(data: bytes, *, n: int | None = None, count: int | None = None, params: bytes | None = None, payload: bytes | None = None) -> bytes:
    """The same container with some fields replaced and a *valid* CRC (tests the decoder's own checks)."""
    c = unpack(data)
    return pack(c.codec_id, c.n if n is None else n, c.count if count is None else count,
                c.payload if payload is None else payload, c.params if params is None else params, c.flags)


def test_consistent_but_lying_headers_raise() -> None:
    q, s, t, d, e, e2, i = _valid_payloads()
    cases = [
        _repack(q, n=1 << 36, count=1 << 36),  # huge claim: refused via expect_n before allocation
        _repack(q, params=struct.pack("<HI", 0, 512)),  # zero levels
        _repack(q, payload=unpack(q).payload[:12]),  # cannot hold norms + histogram
        _repack(q, payload=unpack(q).payload[:-4]),  # ANS stream cut
        _repack(s, payload=unpack(s).payload[:-1]),
        _repack(s, params=struct.pack("<f", float("inf"))),
        _repack(t, params=struct.pack("<I", 10**6)),  # nested index container longer than the payload
        _repack(t, count=3),
        _repack(d, params=struct.pack("<QI", 1, 1000)),  # block not a power of two
        _repack(d, payload=unpack(d).payload[:-1]),
        _repack(e, params=struct.pack("<QIBf", 1, 65536, 0, 0.5)),  # 0 bits
        _repack(e, params=struct.pack("<QIBf", 1, 65536, 2, 0.5)),  # sub-bit needs 1 bit
        _repack(e2, payload=unpack(e2).payload + b"\0"),
        _repack(i, n=100, count=100),
    ]
    for k, bad in enumerate(cases):
        with pytest.raises(CodecError):
            codec_of(bad).decode(bad, **({} if k == len(cases) - 1 else {"expect_n": 1000}))


def test_bad_codec_parameters_say_what_is_allowed() -> None:
    with pytest.raises(CodecError, match="levels"):
        QSGDCodec(0)
    with pytest.raises(CodecError, match="ratio"):
        TopKCodec(0.0)
    with pytest.raises(CodecError, match="bits"):
        EdenCodec(1.5)
    with pytest.raises(CodecError, match="power of two"):
        DriveCodec(block=3000)
    with pytest.raises(CodecError, match="1-D integer"):
        Int64Codec().encode(np.zeros(3))

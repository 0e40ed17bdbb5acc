"""Decode what you expect, nothing more (issue 10): every codec takes the receiver's ``expect_n`` and
rejects a header that claims another n before allocating; and 10^4 fuzzed payloads over every codec
and bundles (benchmarks/fuzz_payloads.py, the same generator as the 10^5 benchmark) give only
CodecError or a well-formed result, none allocating more than 64 MiB beyond its expected output."""

from __future__ import annotations

import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from deltamask.codecs import CodecError, available_codecs, get_codec
from deltamask.codecs import container
from deltamask.testing.faults import with_header_n

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz_payloads  # noqa: E402


@pytest.mark.parametrize("name", available_codecs())
@pytest.mark.parametrize("claim", [2**32, 2**31 + 7, 1])
def test_a_header_claiming_another_n_is_refused_before_allocating(name: str, claim: int, monkeypatch) -> None:
    # without expect_n the decode limit alone would let n = 2^32 through (4 GiB); make that path fail
    # differently, so this test sees the receiver's check and nothing else
    monkeypatch.setattr(container, "MAX_DECODE_N", 1 << 12)
    rng = np.random.default_rng(3)
    data, n, args = fuzz_payloads.sample(name, rng)
    codec = get_codec(name)
    forged = with_header_n(data, claim if claim != n else n + 1)
    calls = [lambda: codec.decode(forged, args["probs"], expect_n=n) if codec.kind == "mask" else codec.decode(forged, expect_n=n)]
    if codec.kind == "indices":
        calls.append(lambda: codec.decode_mask(forged, expect_n=n))
    for call in calls:
        tracemalloc.start()
        try:
            with pytest.raises(CodecError, match=f"the receiver expects n={n}"):
                call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2 * len(forged) + 65536, peak
    # and the untouched payload decodes under the same expectation
    out = codec.decode(data, args["probs"], expect_n=n) if codec.kind == "mask" else codec.decode(data, expect_n=n)
    assert fuzz_payloads.check_result(name, out, n, data, "decode") is None


def test_ten_thousand_fuzzed_payloads() -> None:
    rep = fuzz_payloads.run(10_000, seed=7)
    d = rep.as_dict()
    assert d["untyped"] == 0, d["untyped_examples"]
    assert d["malformed"] == 0, d["malformed_examples"]
    assert d["over_64MiB"] == 0, (d["largest_extra_MiB"], d["largest_extra_case"])
    assert d["outcomes"].get("decoded", 0) > 100 and d["outcomes"].get("CodecError", 0) > 1000  # both paths exercised


def test_qsgd_with_a_forged_bucket_size_decodes_in_linear_memory() -> None:
    # a 2^32 bucket made the old decoder pad to 2^32 float64 (32 GiB) for a payload of ~100 bytes
    from deltamask.codecs.quant import _QSGD_PARAMS

    codec = get_codec("qsgd")
    x = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    data = codec.encode(x)
    f = list(container.HEADER.unpack_from(data, 0))
    levels, _ = _QSGD_PARAMS.unpack(data[container.HEADER.size:container.HEADER.size + f[6]])
    body = container.HEADER.pack(*f) + _QSGD_PARAMS.pack(levels, 2**32 - 1) + data[container.HEADER.size + f[6]:-4]
    forged = body + struct.pack("<I", zlib.crc32(body))
    tracemalloc.start()
    try:
        out = codec.decode(forged, expect_n=50)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (50,) and peak < 1 << 20, peak
    # the encoder's bucket (512) already held all 50 values in one bucket: the same vector
    np.testing.assert_array_equal(out, codec.decode(data, expect_n=50))

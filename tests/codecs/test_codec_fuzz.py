"""Decoders fed random and mutated payloads fail only with CodecError (never another exception), and a
decode that succeeds returns a well-formed result (benchmarks/fuzz_payloads.py's check_result: shape,
dtype, range, counts that agree with the header)."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from _samples import golden_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from make_golden import GOLDEN

from deltamask.codecs import CodecError, available_codecs, get_codec
from deltamask.codecs import container

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fuzz_payloads import check_result  # noqa: E402

WRITERS = [n for n in available_codecs() if n != "auto"]


@pytest.fixture(autouse=True)
def small_decode_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forged headers may claim any n <= MAX_N; keep outputs small so fuzzing stays fast."""
    monkeypatch.setattr(container, "MAX_DECODE_N", 1 << 20)


def _decode_all(name: str, data: bytes) -> None:
    codec = get_codec(name)
    try:
        if codec.kind == "indices":
            results = [("decode", codec.decode(data)), ("decode_mask", codec.decode_mask(data))]
        elif codec.kind == "mask":
            n = len(golden_input(codec)["probs"])
            results = [("decode", codec.decode(data, np.full(n, 0.3)))]
        else:
            results = [("decode", codec.decode(data))]
    except CodecError:
        return
    n = container.unpack(data).n  # it decoded, so the container is valid
    for how, out in results:
        why = check_result(name, out, n, data, how)
        assert why is None, f"{name}.{how} returned a malformed result on a mutated payload: {why}"


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(available_codecs()), data=st.binary(max_size=200))
def test_random_bytes(name: str, data: bytes) -> None:
    _decode_all(name, data)
    _decode_all(name, container.MAGIC + data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(WRITERS), pos=st.integers(0, 10_000), val=st.integers(0, 255),
       cut=st.integers(0, 10_000), fix_crc=st.booleans(), mode=st.sampled_from(["flip", "truncate", "extend"]))
def test_mutated_golden(name: str, pos: int, val: int, cut: int, fix_crc: bool, mode: str) -> None:
    """Byte flips, truncation and extension; with ``fix_crc`` the CRC is recomputed so the codec's
    own validation (not the checksum) must catch the problem."""
    good = (GOLDEN / f"{name}.bin").read_bytes()
    body = bytearray(good[:-4])
    if mode == "flip":
        body[pos % len(body)] ^= val or 1
    elif mode == "truncate":
        body = body[: cut % len(body)]
    else:
        body += bytes([val]) * (1 + cut % 64)
    data = _recrc(bytes(body)) if fix_crc else bytes(body) + good[-4:]
    _decode_all(name, data)
    if not fix_crc:
        with pytest.raises(CodecError):
            container.unpack(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(WRITERS), n=st.integers(0, 2**40), count=st.integers(0, 2**40),
       params=st.binary(max_size=64), payload=st.binary(max_size=256))
def test_forged_headers(name: str, n: int, count: int, params: bytes, payload: bytes) -> None:
    """Arbitrary header fields and blocks behind a valid CRC."""
    cid = get_codec(name).codec_id
    body = container.HEADER.pack(container.MAGIC, 1, cid, 0, n, count, len(params), len(payload)) + params + payload
    _decode_all(name, _recrc(body))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["fuse8", "fuse16", "fuse8-4w", "fuse16-4w"]), n=st.integers(0, 5000),
       count=st.integers(0, 100), vals=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                                  st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))
def test_forged_filter_params(name: str, n: int, count: int, vals: tuple[int, int, int, int]) -> None:
    """Well-formed but inconsistent filter parameter blocks."""
    from deltamask.codecs.fuse import PARAMS

    codec = get_codec(name)
    seed, sl, sc, al = vals
    params = PARAMS.pack(seed, sl, sc, al, codec.arity, codec.fp_bits, 0)
    payload = bytes(min(al, 4096) * codec.fp_bits // 8)
    body = container.HEADER.pack(container.MAGIC, 1, codec.codec_id, 0, n, count, len(params), len(payload))
    _decode_all(name, _recrc(body + params + payload))

"""The one wire container every deltamask payload travels in.

Every message that crosses the network (uplink or downlink, any codec) is a *container*: a fixed
little-endian header, a codec-specific parameter block, the codec's payload, and a CRC32 trailer.
Everything is explicit little-endian so that a client in another language can read and write it
(see ``docs/wire-format.md``).

Layout (byte offsets, all integers little-endian, unsigned)::

    0   4  magic          b"DMSK"
    4   1  version        FORMAT_VERSION (currently 1)
    5   1  codec_id       registry id of the codec that wrote the payload
    6   2  flags          codec-specific bit flags (0 if unused)
    8   8  n              universe size: number of positions / maskable scalars
    16  8  count          number of keys / elements the payload describes
    24  4  params_len     length of the parameter block in bytes (<= MAX_PARAMS_LEN)
    28  8  payload_len    length of the payload in bytes
    36  .. params         codec-specific fixed-layout parameters
    ..  .. payload        codec-specific bytes
    ..  4  crc32          zlib.crc32 of every byte before it (header, params, payload)

Sizes are validated against the buffer length *before* any allocation, ``n`` / ``count`` are
bounded by :data:`MAX_N`, and a receiver passes the ``n`` it expects (``expect_n=``, accepted by every
codec's ``decode``), so a header that claims 10^12 keys, or 2^32 for a 3M-weight model, is rejected
with :class:`CodecError` instead of being attempted.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"DMSK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBHQQIQ")  # 36 bytes
CRC = struct.Struct("<I")
OVERHEAD_BYTES = HEADER.size + CRC.size
#: Largest universe we accept: 2^36 (~68.7e9) scalars, 80x a ViT-H. Larger claims are corrupt.
MAX_N = 1 << 36
MAX_PARAMS_LEN = 4096
#: Largest universe a decoder will materialize (a bool/float array of length n, e.g. a filter's
#: query-all or the downlink probabilities): 2^32 (~4.3e9, 5x a ViT-g). Raise it deliberately for
#: larger models; payloads whose output is bounded by their own length do not need it.
MAX_DECODE_N = 1 << 32


class CodecError(ValueError):
    """A payload could not be encoded or decoded; the message says what was wrong."""


@dataclass(frozen=True)
class Container:
    """A parsed container: header fields plus views of the parameter block and payload."""

    codec_id: int
    flags: int
    n: int
    count: int
    params: bytes
    payload: bytes
    version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return OVERHEAD_BYTES + len(self.params) + len(self.payload)


def pack(codec_id: int, n: int, count: int, payload: bytes, params: bytes = b"", flags: int = 0) -> bytes:
    """Serialize a container; raises :class:`CodecError` for out-of-range fields."""
    if not 0 <= codec_id < 256:
        raise CodecError(f"codec id {codec_id} is outside 0..255")
    if not 0 <= n <= MAX_N:
        raise CodecError(f"n={n} is outside 0..{MAX_N}")
    if not 0 <= count <= MAX_N:
        raise CodecError(f"count={count} is outside 0..{MAX_N}")
    if len(params) > MAX_PARAMS_LEN:
        raise CodecError(f"parameter block of {len(params)} bytes exceeds {MAX_PARAMS_LEN}")
    head = HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, flags, n, count, len(params), len(payload))
    body = b"".join((head, params, payload))
    return body + CRC.pack(zlib.crc32(body))


def unpack(data: bytes | bytearray | memoryview, expect_codec_id: int | None = None, *, expect_n: int | None = None) -> Container:
    """Parse and verify a container (magic, version, sizes, CRC) without trusting any field.

    ``expect_n``: the universe size (for arrays and probabilities, the element count) the receiver
    expects; a header that claims another ``n`` is rejected here, before anything is allocated, so a
    decode's work and memory are bounded by the receiver's own N and the payload's length. Every
    receiving path in deltamask passes it; without it only :data:`MAX_DECODE_N` bounds the output."""
    buf = bytes(data)
    if len(buf) < OVERHEAD_BYTES:
        raise CodecError(f"payload truncated: {len(buf)} bytes is shorter than the {OVERHEAD_BYTES}-byte header+CRC")
    magic, version, codec_id, flags, n, count, params_len, payload_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"not a deltamask payload: magic {magic!r} != {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {version} (this build reads version {FORMAT_VERSION})")
    if n > MAX_N:
        raise CodecError(f"header claims n={n}, above the limit {MAX_N}")
    if expect_n is not None and n != expect_n:
        raise CodecError(f"header claims n={n}, the receiver expects n={expect_n} (a payload for another model or layer)")
    if count > MAX_N:
        raise CodecError(f"header claims count={count}, above the limit {MAX_N}")
    if params_len > MAX_PARAMS_LEN:
        raise CodecError(f"header claims a {params_len}-byte parameter block, above {MAX_PARAMS_LEN}")
    expected = OVERHEAD_BYTES + params_len + payload_len
    if expected != len(buf):
        raise CodecError(
            f"payload size mismatch: header says {expected} bytes in all, buffer has {len(buf)} (truncated or padded)"
        )
    body_end = len(buf) - CRC.size
    (crc,) = CRC.unpack_from(buf, body_end)
    if zlib.crc32(memoryview(buf)[:body_end]) != crc:
        raise CodecError("CRC32 mismatch: the payload is corrupted")
    if expect_codec_id is not None and codec_id != expect_codec_id:
        raise CodecError(f"payload was written by codec id {codec_id}, expected {expect_codec_id}")
    p0 = HEADER.size
    return Container(
        codec_id=codec_id,
        flags=flags,
        n=n,
        count=count,
        params=buf[p0 : p0 + params_len],
        payload=buf[p0 + params_len : body_end],
        version=version,
    )


def split_containers(data: bytes, what: str = "bundle") -> list[bytes]:
    """Split back-to-back containers (each self-delimiting by its header's lengths); a truncated run
    raises CodecError naming ``what``. The containers themselves are verified by whoever unpacks them."""
    out, pos, n = [], 0, len(data)
    while pos < n:
        if n - pos < HEADER.size + CRC.size:
            raise CodecError(f"{what} truncated at byte {pos}: {n - pos} bytes left, a container needs {HEADER.size + CRC.size}")
        fields_ = HEADER.unpack_from(data, pos)
        length = HEADER.size + fields_[6] + fields_[7] + CRC.size
        if pos + length > n:
            raise CodecError(f"{what} truncated: container at byte {pos} claims {length} bytes, {n - pos} left")
        out.append(data[pos : pos + length])
        pos += length
    return out


def peek_codec_id(data: bytes | bytearray | memoryview) -> int:
    """The codec id of a container, after full verification."""
    return unpack(data).codec_id


def check_decode_size(n: int, what: str = "payload") -> None:
    """Refuse to materialize an output of ``n`` elements above :data:`MAX_DECODE_N` (read at call time)."""
    limit = MAX_DECODE_N
    if n > limit:
        raise CodecError(f"{what}: header claims n={n}, above the decode limit {limit} (container.MAX_DECODE_N)")

"""Misbehaving clients, for the fault tests of every engine (tests only; never used by a run).

:func:`forge` turns a client's real reply payload into a hostile one of a given kind; the local engine's
``fault`` hook and the Flower ClientApp's ``test-fault`` node setting both use it, so both engines are
tested against the same bytes:

* ``truncated``: the first half of the payload;
* ``oversized``: the payload plus 1 KiB of zeros;
* ``wrong-codec``: the last container (the update) replaced by a valid container of another codec with
  the same ``n`` (an index set where a dense mask was expected, or the other way round);
* ``wrong-n``: the last container's header claims ``n + 1`` (CRC recomputed: only the receiver's
  expectation catches it);
* ``n32``: the last container's header claims ``n = 2^32`` (CRC recomputed), the message that once made a
  server allocate 4 GiB.
"""

from __future__ import annotations

import struct
import zlib

PAYLOAD_FAULTS = ("truncated", "oversized", "wrong-codec", "wrong-n", "n32")


def with_header_n(container: bytes, n: int) -> bytes:
    """The container with its header's ``n`` replaced and the CRC recomputed (only a receiver's
    expectation can then tell)."""
    from .codecs.container import HEADER

    fields = list(HEADER.unpack_from(container, 0))
    fields[4] = n
    body = HEADER.pack(*fields) + container[HEADER.size:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def forge(kind: str, payload: bytes) -> bytes:
    """The hostile payload of ``kind`` (one of :data:`PAYLOAD_FAULTS`) made from a real one."""
    import numpy as np

    from .codecs import codec_of, get_codec
    from .codecs.container import unpack
    from .methods.base import join_bundle, split_bundle

    if kind == "truncated":
        return payload[: len(payload) // 2]
    if kind == "oversized":
        return payload + bytes(1024)
    parts = split_bundle(payload)
    if not parts:
        raise ValueError("cannot forge from an empty payload")
    last = parts[-1]
    n = unpack(last).n
    if kind == "wrong-codec":
        if codec_of(last).kind == "indices":
            forged = get_codec("bitpack").encode(np.zeros(n, dtype=bool))
        else:
            forged = get_codec("ans").encode(np.zeros(0, dtype=np.int64), n)
    elif kind == "wrong-n":
        forged = with_header_n(last, n + 1)
    elif kind == "n32":
        forged = with_header_n(last, 1 << 32)
    else:
        raise ValueError(f"unknown fault {kind!r}; valid: {', '.join(PAYLOAD_FAULTS)}")
    return join_bundle([*parts[:-1], forged])

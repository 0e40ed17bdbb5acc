"""Framing between a SuperNode's short-lived ClientApp processes and its long-lived node worker
(:mod:`deltamask.engines.flower.worker`), over a local unix socket. Standard library only, so the
ClientApp side imports nothing heavy.

A frame is a JSON header and named binary blobs::

    u64 header length | header (UTF-8 JSON, with "blobs": [[name, length], ...]) | blob bytes, in order

No pickle: neither side executes anything the other sends. Lengths are bounded so that a corrupt frame
fails with :class:`WireError` instead of allocating without limit.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

#: bounds on one frame (a header is a few kB; a blob is a payload or a client cache array)
MAX_HEADER = 64 << 20
MAX_BLOB = 16 << 30
_U64 = struct.Struct(">Q")


class WireError(ConnectionError):
    """The other side closed the connection or sent a frame that does not parse."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> None:
    blobs = blobs or {}
    head = dict(header)
    head["blobs"] = [[name, len(data)] for name, data in blobs.items()]
    raw = json.dumps(head, sort_keys=True).encode()
    sock.sendall(_U64.pack(len(raw)) + raw)
    for data in blobs.values():
        sock.sendall(data)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, bytes]]:
    (n,) = _U64.unpack(_recv_exact(sock, _U64.size))
    if n > MAX_HEADER:
        raise WireError(f"frame header of {n} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(_recv_exact(sock, n))
        spec = [(str(name), int(length)) for name, length in header.pop("blobs")]
    except (ValueError, KeyError, TypeError) as e:
        raise WireError(f"malformed frame header: {e}") from None
    blobs: dict[str, bytes] = {}
    for name, length in spec:
        if not 0 <= length <= MAX_BLOB:
            raise WireError(f"blob {name!r} claims {length} bytes")
        blobs[name] = _recv_exact(sock, length)
    return header, blobs


def pack_arrays(arrays: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """numpy arrays -> (header entry {name: [dtype, shape]}, blobs) without importing numpy here."""
    spec, blobs = {}, {}
    for name, a in arrays.items():
        spec[name] = [a.dtype.str, list(a.shape)]
        blobs[prefix + name] = a.tobytes(order="C")
    return spec, blobs


def unpack_arrays(spec: dict[str, Any], blobs: dict[str, bytes], prefix: str) -> dict[str, Any]:
    import numpy as np

    out = {}
    for name, (dtype, shape) in spec.items():
        data = blobs.get(prefix + name)
        if data is None:
            raise WireError(f"frame lacks the blob of array {name!r}")
        a = np.frombuffer(data, dtype=np.dtype(dtype))
        if a.size != int(np.prod(shape, dtype=np.int64)):
            raise WireError(f"array {name!r}: {a.size} elements for shape {shape}")
        out[name] = a.reshape(shape).copy()
    return out

"""Packing deltamask's codec ``bytes`` into Flower records and back, and counting what Flower sends.

A payload (a bundle of codec containers, see :mod:`deltamask.methods.base`) travels unchanged:

* small payloads (< :data:`SMALL_PAYLOAD_BYTES`) as ``ConfigRecord({"payload": bytes})``;
* larger ones as one opaque :class:`flwr.app.Array` (``dtype="uint8"``, ``shape=(len,)``,
  ``stype="deltamask/<codecs>/v1"``, ``data=bytes``) in an ``ArrayRecord``; Flower chunks it
  itself on the wire.

Either way it sits under the record key :data:`PAYLOAD_KEY` of the message's ``RecordDict``, beside a
``ConfigRecord`` of scalars (:data:`META_KEY`). :func:`unpack_payload` accepts both forms and raises
:class:`RecordError` for anything else, so a malformed message is dropped with a reason, never trusted.

The client's cache (``ClientContext.state``: numpy arrays and scalars) is kept in Flower's per-node
``context.state`` as one ``ArrayRecord`` (numpy arrays) and one ``ConfigRecord`` (JSON of the scalars).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

PAYLOAD_KEY = "deltamask.payload"
META_KEY = "deltamask.meta"
STATE_ARRAYS_KEY = "deltamask.state.arrays"
STATE_SCALARS_KEY = "deltamask.state.scalars"
STYPE_PREFIX = "deltamask/"
STYPE_SUFFIX = "/v1"
#: below this size a payload rides in a ConfigRecord (no Array/chunk objects for a few hundred bytes)
SMALL_PAYLOAD_BYTES = 16 * 1024


class RecordError(ValueError):
    """A message does not hold a well-formed deltamask payload; the message says what was wrong."""


def payload_stype(payload: bytes) -> str:
    """``deltamask/<codec>[+<codec>...]/v1`` from the containers in the bundle (``empty`` when none)."""
    from ...codecs import codec_of  # the codecs import torch: not at module level, which a light ClientApp loads
    from ...codecs.container import CodecError
    from ...codecs.bundle import split_bundle

    try:
        names = [codec_of(p).name for p in split_bundle(payload)]
    except (CodecError, KeyError, ValueError):
        names = ["raw"]
    return f"{STYPE_PREFIX}{'+'.join(names) or 'empty'}{STYPE_SUFFIX}"


def pack_payload(payload: bytes, meta: dict[str, Any] | None = None, small: int = SMALL_PAYLOAD_BYTES, stype: str | None = None) -> RecordDict:
    """A RecordDict carrying ``payload`` unchanged (plus scalar ``meta``). ``stype``: the payload's
    :func:`payload_stype` when the caller already has it."""
    content = RecordDict()
    if len(payload) < small:
        content[PAYLOAD_KEY] = ConfigRecord({"payload": bytes(payload)})
    else:
        arr = Array(dtype="uint8", shape=(len(payload),), stype=stype or payload_stype(payload), data=bytes(payload))
        content[PAYLOAD_KEY] = ArrayRecord({"payload": arr})
    content[META_KEY] = ConfigRecord(dict(meta or {}))
    return content


class PayloadTooLarge(RecordError):
    """A payload longer than the receiver's cap (checked before the bytes are copied)."""


def _check_size(n: int, max_bytes: int | None) -> None:
    from ...errors import oversize_reason  # light: no torch

    why = oversize_reason(n, max_bytes)
    if why:
        raise PayloadTooLarge(why)


def unpack_payload(content: RecordDict, max_bytes: int | None = None) -> bytes:
    """The payload bytes of a message packed by :func:`pack_payload`; RecordError if malformed,
    :class:`PayloadTooLarge` if longer than ``max_bytes`` (checked before the copy)."""
    if PAYLOAD_KEY not in content:
        raise RecordError(f"message holds no {PAYLOAD_KEY!r} record (keys: {sorted(content.keys())})")
    rec = content[PAYLOAD_KEY]
    if isinstance(rec, ConfigRecord):
        data = rec.get("payload")
        if not isinstance(data, bytes):
            raise RecordError(f"{PAYLOAD_KEY!r} ConfigRecord has no bytes 'payload' (got {type(data).__name__})")
        _check_size(len(data), max_bytes)
        return data
    if isinstance(rec, ArrayRecord):
        arr = rec.get("payload")
        if arr is None:
            raise RecordError(f"{PAYLOAD_KEY!r} ArrayRecord has no 'payload' array")
        if not (arr.stype.startswith(STYPE_PREFIX) and arr.stype.endswith(STYPE_SUFFIX)):
            raise RecordError(f"payload array has stype {arr.stype!r}, expected {STYPE_PREFIX}...{STYPE_SUFFIX}")
        if arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
            raise RecordError(f"payload array claims dtype {arr.dtype} shape {tuple(arr.shape)} for {len(arr.data)} bytes")
        _check_size(len(arr.data), max_bytes)
        return bytes(arr.data)
    raise RecordError(f"{PAYLOAD_KEY!r} is a {type(rec).__name__}, expected ConfigRecord or ArrayRecord")


def unpack_meta(content: RecordDict) -> dict[str, Any]:
    rec = content.get(META_KEY)
    if not isinstance(rec, ConfigRecord):
        raise RecordError(f"message holds no {META_KEY!r} ConfigRecord")
    return dict(rec)


def record_bytes(content: RecordDict) -> int:
    """What Flower's own ``count_bytes()`` says the message's records hold. Flower 1.42 raises on an
    empty ``bytes`` value (a client already up to date gets an empty downlink), counted here as its key."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ConfigRecord) and any(isinstance(v, bytes) and not v for v in rec.values()):
            rest = ConfigRecord({k: v for k, v in rec.items() if not (isinstance(v, bytes) and not v)})
            total += rest.count_bytes() + sum(len(k) for k, v in rec.items() if isinstance(v, bytes) and not v)
        else:
            total += rec.count_bytes()
    return int(total)


def wire_bytes(message: Message) -> int:
    """Bytes of the serialized message: every object Flower deflates for it (metadata, records,
    array chunks, object headers). This is what crosses the network, short of gRPC/HTTP framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(o.deflate()) for o in get_all_nested_objects(message).values()))


# --- the client's cache in context.state ----------------------------------------------------------
def split_state(cache: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A ``ClientContext.state`` dict as (contiguous numpy arrays, plain JSON scalars)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in cache.items() if isinstance(v, np.ndarray)}
    scalars = {k: (v.item() if hasattr(v, "item") else v) for k, v in cache.items() if not isinstance(v, np.ndarray)}
    return arrays, scalars


def save_client_state(state: RecordDict, cache: dict[str, Any]) -> None:
    """Store a ``ClientContext.state`` dict (numpy arrays + JSON scalars) in Flower's ``context.state``."""
    arrays, scalars = split_state(cache)
    state[STATE_ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    state[STATE_SCALARS_KEY] = ConfigRecord({"json": json.dumps(scalars, sort_keys=True)})


def load_client_state(state: RecordDict) -> dict[str, Any]:
    """The cache :func:`save_client_state` stored ({} when there is none yet)."""
    out: dict[str, Any] = {}
    arrays = state.get(STATE_ARRAYS_KEY)
    if isinstance(arrays, ArrayRecord):
        out.update({k: a.numpy() for k, a in arrays.items()})
    scalars = state.get(STATE_SCALARS_KEY)
    if isinstance(scalars, ConfigRecord) and isinstance(scalars.get("json"), str):
        out.update(json.loads(scalars["json"]))
    return out


def clear_client_state(state: RecordDict) -> None:
    for key in (STATE_ARRAYS_KEY, STATE_SCALARS_KEY):
        if key in state:
            del state[key]

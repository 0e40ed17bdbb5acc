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
    from ..codecs.container import HEADER

    fields = list(HEADER.unpack_from(container, 0))
    fields[4] = n
    body = HEADER.pack(*fields) + container[HEADER.size:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def forge(kind: str, payload: bytes) -> bytes:
    """The hostile payload of ``kind`` (one of :data:`PAYLOAD_FAULTS`) made from a real one."""
    import numpy as np

    from ..codecs import codec_of, get_codec
    from ..codecs.container import unpack
    from ..codecs.bundle import join_bundle, split_bundle

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


# --- attacks (issue 21): hostile clients, for the attack tests and benchmarks/bench_attacks.py ------------
#: every attack of the catalogue; ``sybil`` (partition claims) is the Flower transport's (benchmarks/bench_sybil.py)
ATTACKS = (
    "all-flips",  # the index set names all N weights as flipped (73x an honest reply's bytes)
    "random-cap",  # random flips exactly at the cap (ceil(kappa * N) by default; max_flip_fraction)
    "anti-update",  # as many flips as the honest delta, on weights it keeps, where theta_g is most certain
    "nan-head",  # one NaN in the head (warm-up rounds, or train_head)
    "huge-bias",  # head bias[0] = 60000 (every prediction class 0)
    "targeted-bias",  # head bias[0] += 20 (finite and within max_abs_param: only clipping / median stop it)
    "forged-samples",  # num_samples = 10^9 (hands one client the whole mask with weighted = true)
    "forged-metrics",  # num_keys = NaN, train_loss = inf
    "label-flip",  # data poisoning: trains honestly on labels y -> C-1-y
    "scaled-update",  # weight baselines: the update times 100
)


class Attack:
    """A malicious client of one kind (:data:`ATTACKS`). The local engine's ``fault`` hook may return one:
    the engine then trains on ``poison_data(data)`` and sends ``forge_reply(reply, ctx, method)``."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; valid: {', '.join(ATTACKS)}")
        self.kind = kind
        self.seed = seed

    def poison_data(self, data):  # type: ignore[no-untyped-def]
        if self.kind != "label-flip":
            return data
        from ..methods.base import ClientData

        classes = int(data.y.max()) + 1 if data.y.numel() else 1
        return ClientData(data.client_id, data.h, (classes - 1 - data.y).clone())

    def forge_reply(self, reply, ctx, method):  # type: ignore[no-untyped-def]
        import numpy as np

        from ..codecs import codec_of
        from ..codecs.bundle import join_bundle, split_bundle
        from ..methods.base import Reply

        k = self.kind
        if k == "forged-samples":
            return Reply(reply.client_id, reply.payload, 10**9, dict(reply.metrics))
        if k == "forged-metrics":
            return Reply(reply.client_id, reply.payload, reply.num_samples, {**reply.metrics, "num_keys": float("nan"), "train_loss": float("inf")})
        if k == "label-flip":
            return reply
        parts = split_bundle(reply.payload)
        kinds = [codec_of(p).kind for p in parts]
        rng = np.random.default_rng([self.seed, ctx.round, ctx.client_id, 21])
        out = list(parts)
        if k in ("nan-head", "huge-bias", "targeted-bias"):
            if "array" not in kinds:
                return reply  # no head in this reply (a mask round without train_head): sends it honestly
            i = kinds.index("array")
            w, b = method.decode_head(parts[i])
            w, b = w.copy(), b.copy()
            if k == "nan-head":
                w[0, 0] = np.nan
            elif k == "huge-bias":
                b[0] = 60000.0
            else:
                b[0] += 20.0
            out[i] = method.encode_head(w, b)
        elif k in ("all-flips", "random-cap", "anti-update"):
            if "indices" not in kinds:
                return reply
            i = kinds.index("indices")
            codec = codec_of(parts[i])
            n = method.n
            if k == "all-flips":
                idx = np.arange(n, dtype=np.int64)
            elif k == "random-cap":
                cap = min(int(method.flip_cap(ctx.round, codec.lossy)), n)
                idx = np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)
            else:
                honest = np.asarray(codec.decode(parts[i], expect_n=n), dtype=np.int64)
                theta = np.asarray(ctx.state["theta"], dtype=np.float64)
                certainty = np.abs(theta - 0.5) + 1e-9 * rng.random(n)  # ties broken at random
                certainty[honest] = -1.0  # what the honest delta keeps at the reference
                idx = np.sort(np.argsort(-certainty, kind="stable")[: honest.size]).astype(np.int64)
            seed = int(rng.integers(0, 2**31))
            out[i] = codec.encode(idx, n, seed=seed)
        elif k == "scaled-update":
            i = len(parts) - 1
            codec = codec_of(parts[i])
            if codec.name != "f32":
                return reply
            est = np.asarray(codec.decode(parts[i], expect_n=method.p), np.float32)
            out[i] = codec.encode((est * 100).astype(np.float32))
        return Reply(reply.client_id, join_bundle(out), reply.num_samples, dict(reply.metrics))

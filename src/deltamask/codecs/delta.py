"""``theta-delta``: theta coded against the version the client already holds (issue 9).

A snapshot (``probs-counts``, ``probs-q8``, ...) carries theta on its own. This container carries
theta *relative to* a version the receiver cached, named by that version's digest (:func:`theta_digest`,
BLAKE2b-128 of theta's float32 bytes), and the digest of the theta the receiver must end with, which
it checks. Three modes:

``same``    nothing changed: only the digest of the theta the receiver must already hold (40 + 34 bytes).
``cond``    theta's integer *levels* (the keep-counts ``0..K`` when priors reset every round, else the
            8-bit quantization levels) coded conditioned on the cached version's levels: one ANS stream
            per context, each under its own histogram (sent sparsely in the params). For counts the
            context is the cached count and the symbol the new count (a transition table); for q8 the
            context is the cached level's bucket (level >> 3) and the symbol the change ``(q_t - q_v) mod
            256``. Exact: the receiver rebuilds the same levels, hence the same theta.
``replay``  the accepted uplink payloads of the rounds the receiver missed, round by round: the receiver
            re-runs the server's aggregation from its cached theta (only where theta is a function of the
            round's counts: priors reset every round, unweighted). What it needs to rebuild is in
            :mod:`deltamask.methods.downlink`; this module only frames the payloads.

Wire layout (little-endian), in the container's params: ``mode u8, kind u8, base digest 16 B, target
digest 16 B``, then per mode:

* cond: ``total_t u32, stat u8, eps f32, prior_a f32, prior_b f32, total_v u32, groups u32``. The payload
  opens with the group table, per group ``context u16, count u32, nnz u16, stream_bytes u32`` and ``nnz``
  pairs ``symbol u16, freq u32`` (in the payload: 32 q8 contexts' histograms can pass the 4 KiB params
  limit), then holds the groups' streams back to back (a group with one symbol has an empty stream).
* replay: ``rounds u16``, then per round ``round u32, payloads u16``. The payload is every round's uplink
  containers back to back (each container is self-delimiting).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import DeltaCodec, register
from .container import MAX_N, CodecError, pack, split_containers, unpack
from .dense import _STAT_IDS
from .entropy import ans_decode_symbols, ans_encode_symbols

MODES = {"same": 0, "cond": 1, "replay": 2}
LEVEL_KINDS = {"counts": 0, "q8": 1}
_HEAD = struct.Struct("<BB16s16s")
_COND = struct.Struct("<IBfffII")
_GROUP = struct.Struct("<HIHI")
_PAIR = struct.Struct("<HI")
_REPLAY = struct.Struct("<H")
_ROUND = struct.Struct("<IH")
#: q8 contexts: the cached level's top 5 bits (32 buckets)
Q8_SHIFT = 3
#: the largest counts alphabet the conditional code takes (contexts are u16)
MAX_COUNTS_TOTAL = 1000


def theta_digest(theta: np.ndarray) -> bytes:
    """BLAKE2b-128 of theta as little-endian float32: names a theta version on both sides."""
    t = np.ascontiguousarray(np.asarray(theta, dtype="<f4").ravel())
    return hashlib.blake2b(memoryview(t).cast("B"), digest_size=16).digest()


@dataclass
class DeltaMessage:
    """A parsed ``theta-delta`` container (structure checked; levels not yet decoded)."""

    mode: str
    n: int
    kind: str
    base: bytes
    target: bytes
    # cond
    total_t: int = 0
    stat: str = "mode"
    eps: float = 0.0
    prior: tuple[float, float] = (1.0, 1.0)
    total_v: int = 0
    groups: list[tuple[int, int, np.ndarray, bytes]] = field(default_factory=list)  # (context, count, hist, stream)
    # replay
    rounds: list[tuple[int, list[bytes]]] = field(default_factory=list)


def contexts_and_symbols(kind: str, levels_t: np.ndarray | None, levels_v: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """(contexts, symbols, context alphabet, symbol alphabet) of the conditional code."""
    v = np.asarray(levels_v).ravel()
    if kind == "counts":
        ctx = v.astype(np.int64)
        sym = None if levels_t is None else np.asarray(levels_t).ravel().astype(np.int64)
        return ctx, sym, 0, 0
    ctx = (v.astype(np.int64) >> Q8_SHIFT)
    sym = None if levels_t is None else (np.asarray(levels_t).ravel().astype(np.int64) - v.astype(np.int64)) % 256
    return ctx, sym, 256 >> Q8_SHIFT, 256


def conditional_entropy_bits(kind: str, levels_t: np.ndarray, levels_v: np.ndarray, alphabet_t: int, alphabet_v: int) -> float:
    """Empirical ``N * H(levels_t | context(levels_v))`` in bits: what the ``cond`` streams approach
    (their histograms are exactly these empirical conditionals), without the params."""
    ctx, sym, a_ctx, a_sym = contexts_and_symbols(kind, levels_t, levels_v)
    a_ctx = a_ctx or alphabet_v
    a_sym = a_sym or alphabet_t
    joint = np.bincount(ctx * a_sym + sym, minlength=a_ctx * a_sym).reshape(a_ctx, a_sym).astype(np.float64)
    row = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(joint > 0, joint / np.where(row > 0, row, 1.0), 1.0)
    return float(-(joint * np.log2(p)).sum())


def marginal_entropy_bits(levels: np.ndarray, alphabet: int) -> float:
    """Empirical ``N * H(levels)`` in bits (what a snapshot's ANS stream approaches)."""
    h = np.bincount(np.asarray(levels).ravel().astype(np.int64), minlength=alphabet).astype(np.float64)
    h = h[h > 0]
    return float(-(h * np.log2(h / h.sum())).sum()) if h.size else 0.0


@register
class ThetaDeltaCodec(DeltaCodec):
    name = "theta-delta"
    codec_id = 56
    kind = "delta"
    description = "theta against the receiver's cached version: same / conditional levels / replayed uplinks"

    # --- encoders ----------------------------------------------------------------------------------
    def encode(self, mode: str = "same", n: int = 0, base: bytes = b"", target: bytes = b"", kind: str = "counts", **kw: Any) -> bytes:
        if mode == "same":
            return self.encode_same(n, target)
        if mode == "cond":
            return self.encode_cond(kw["levels_t"], kw["levels_v"], kind, kw["total_t"], kw["total_v"], kw.get("stat", "mode"),
                                    kw.get("eps", 0.01), kw.get("prior", (1.0, 1.0)), base, target)
        if mode == "replay":
            return self.encode_replay(n, kw["rounds"], base, target)
        raise CodecError(f"theta-delta: unknown mode {mode!r}; valid: {', '.join(MODES)}")

    def encode_same(self, n: int, digest: bytes) -> bytes:
        return pack(self.codec_id, n, 0, b"", _HEAD.pack(MODES["same"], 0, _digest(digest), _digest(digest)))

    def encode_cond(self, levels_t: np.ndarray, levels_v: np.ndarray, kind: str, total_t: int, total_v: int, stat: str,
                    eps: float, prior: tuple[float, float], base: bytes, target: bytes) -> bytes:
        if kind not in LEVEL_KINDS:
            raise CodecError(f"theta-delta: unknown level kind {kind!r}")
        t = np.asarray(levels_t).ravel()
        v = np.asarray(levels_v).ravel()
        if t.shape != v.shape:
            raise CodecError(f"theta-delta: {t.size} new levels against {v.size} cached ones")
        if kind == "counts" and not (0 < total_t <= MAX_COUNTS_TOTAL and 0 < total_v <= MAX_COUNTS_TOTAL):
            raise CodecError(f"theta-delta: counts totals must lie in 1..{MAX_COUNTS_TOTAL}")
        if kind == "q8":
            total_t = total_v = 255
        if t.size and (t.min() < 0 or t.max() > total_t or v.min() < 0 or v.max() > total_v):
            raise CodecError("theta-delta: levels outside their alphabet")
        ctx, sym, a_ctx, a_sym = contexts_and_symbols(kind, t, v)
        a_ctx = a_ctx or total_v + 1
        a_sym = a_sym or total_t + 1
        order = np.argsort(ctx, kind="stable")
        sizes = np.bincount(ctx, minlength=a_ctx)
        params = _HEAD.pack(MODES["cond"], LEVEL_KINDS[kind], _digest(base), _digest(target)) + \
            _COND.pack(total_t, _STAT_IDS[stat], eps, *prior, total_v, int(np.count_nonzero(sizes)))
        table, body, lo = [], [], 0
        for c in range(a_ctx):
            cnt = int(sizes[c])
            if not cnt:
                continue
            hist, stream = ans_encode_symbols(sym[order[lo : lo + cnt]], a_sym)
            lo += cnt
            nz = np.flatnonzero(hist)
            table.append(_GROUP.pack(c, cnt, nz.size, len(stream)))
            table.extend(_PAIR.pack(int(s), int(hist[s])) for s in nz)
            body.append(stream)
        return pack(self.codec_id, t.size, t.size, b"".join(table) + b"".join(body), params)

    def encode_replay(self, n: int, rounds: list[tuple[int, list[bytes]]], base: bytes, target: bytes) -> bytes:
        params = [_HEAD.pack(MODES["replay"], 0, _digest(base), _digest(target)), _REPLAY.pack(len(rounds))]
        params += [_ROUND.pack(r, len(ps)) for r, ps in rounds]
        body = b"".join(p for _, ps in rounds for p in ps)
        return pack(self.codec_id, n, sum(len(ps) for _, ps in rounds), body, b"".join(params))

    # --- decoders ----------------------------------------------------------------------------------
    def decode(self, data: bytes, *, expect_n: int | None = None) -> DeltaMessage:
        """The parsed message (every length and count checked against the container)."""
        c = unpack(data, self.codec_id, expect_n=expect_n)
        if len(c.params) < _HEAD.size:
            raise CodecError("theta-delta: parameter block too short")
        mode_id, kind_id, base, target = _HEAD.unpack_from(c.params)
        mode = {v: k for k, v in MODES.items()}.get(mode_id)
        kind = {v: k for k, v in LEVEL_KINDS.items()}.get(kind_id)
        if mode is None or kind is None:
            raise CodecError(f"theta-delta: unknown mode {mode_id} or level kind {kind_id}")
        msg = DeltaMessage(mode, c.n, kind, base, target)
        rest = c.params[_HEAD.size :]
        if mode == "same":
            if rest or c.payload or c.count or base != target:
                raise CodecError("theta-delta: a 'same' message carries nothing but its digest")
            return msg
        if mode == "replay":
            return self._parse_replay(msg, rest, c.payload, c.count)
        return self._parse_cond(msg, rest, c.payload, c.count)

    def _parse_cond(self, msg: DeltaMessage, rest: bytes, payload: bytes, count: int) -> DeltaMessage:
        if len(rest) < _COND.size:
            raise CodecError("theta-delta: cond parameters too short")
        total_t, stat_id, eps, a0, b0, total_v, ngroups = _COND.unpack_from(rest)
        stat = {v: k for k, v in _STAT_IDS.items()}.get(stat_id)
        limit = MAX_COUNTS_TOTAL if msg.kind == "counts" else 255
        if stat is None or not 0 < total_t <= limit or not 0 < total_v <= limit or not 0.0 <= eps < 0.5 or count != msg.n:
            raise CodecError(f"theta-delta: bad cond parameters (totals {total_t}/{total_v}, stat {stat_id}, eps {eps})")
        if msg.kind == "q8" and (total_t != 255 or total_v != 255):
            raise CodecError("theta-delta: q8 levels have totals 255")
        a_ctx = (256 >> Q8_SHIFT) if msg.kind == "q8" else total_v + 1
        a_sym = 256 if msg.kind == "q8" else total_t + 1
        if ngroups > a_ctx:
            raise CodecError(f"theta-delta: {ngroups} groups for {a_ctx} contexts")
        msg.total_t, msg.stat, msg.eps, msg.prior, msg.total_v = total_t, stat, eps, (a0, b0), total_v
        if len(rest) != _COND.size:
            raise CodecError("theta-delta: cond parameters have the wrong length")
        rest, pos, seen, last = payload, 0, 0, -1  # the group table opens the payload, the streams follow it
        heads = []
        for _ in range(ngroups):
            if pos + _GROUP.size > len(rest):
                raise CodecError("theta-delta: group table truncated")
            ctx, cnt, nnz, nbytes = _GROUP.unpack_from(rest, pos)
            pos += _GROUP.size
            if ctx <= last or ctx >= a_ctx or not 0 < nnz <= a_sym or cnt == 0:
                raise CodecError(f"theta-delta: bad group (context {ctx}, {nnz} symbols, count {cnt})")
            last = ctx
            if pos + nnz * _PAIR.size > len(rest):
                raise CodecError("theta-delta: histogram truncated")
            hist = np.zeros(a_sym, dtype=np.int64)
            for j in range(nnz):
                s, f = _PAIR.unpack_from(rest, pos + j * _PAIR.size)
                if s >= a_sym or f == 0 or hist[s]:
                    raise CodecError("theta-delta: bad histogram entry")
                hist[s] = f
            pos += nnz * _PAIR.size
            if int(hist.sum()) != cnt:
                raise CodecError(f"theta-delta: group histogram sums to {int(hist.sum())}, expected {cnt}")
            heads.append((ctx, cnt, hist, nbytes))
            seen += cnt
        body_pos = pos
        for ctx, cnt, hist, nbytes in heads:
            if body_pos + nbytes > len(payload):
                raise CodecError("theta-delta: group stream runs past the payload")
            msg.groups.append((ctx, cnt, hist, payload[body_pos : body_pos + nbytes]))
            body_pos += nbytes
        if body_pos != len(payload) or seen != msg.n:
            raise CodecError(f"theta-delta: groups cover {seen} of {msg.n} levels or leave bytes over")
        return msg

    def _parse_replay(self, msg: DeltaMessage, rest: bytes, payload: bytes, count: int) -> DeltaMessage:
        if len(rest) < _REPLAY.size:
            raise CodecError("theta-delta: replay parameters too short")
        (nrounds,) = _REPLAY.unpack_from(rest)
        if len(rest) != _REPLAY.size + nrounds * _ROUND.size:
            raise CodecError("theta-delta: replay round table has the wrong length")
        table = [_ROUND.unpack_from(rest, _REPLAY.size + i * _ROUND.size) for i in range(nrounds)]
        if sum(k for _, k in table) != count:
            raise CodecError("theta-delta: replay payload count disagrees with the round table")
        parts = split_containers(payload, "theta-delta: replayed payload")
        if len(parts) != count:
            raise CodecError(f"theta-delta: {len(parts)} replayed payloads, header says {count}")
        i = 0
        for r, k in table:
            msg.rounds.append((r, parts[i : i + k]))
            i += k
        return msg

    def cond_levels(self, msg: DeltaMessage, levels_v: np.ndarray, total_v: int) -> np.ndarray:
        """The new levels of a ``cond`` message, decoded against the cached ``levels_v`` (out of ``total_v``)."""
        v = np.asarray(levels_v).ravel()
        if msg.mode != "cond" or v.size != msg.n or total_v != msg.total_v:
            raise CodecError(f"theta-delta: the cached levels ({v.size} out of {total_v}) are not what the message was coded "
                             f"against ({msg.n} out of {msg.total_v})")
        ctx, _, a_ctx, _ = contexts_and_symbols(msg.kind, None, v)
        a_ctx = a_ctx or msg.total_v + 1
        if v.size and (v.min() < 0 or v.max() > total_v):
            raise CodecError("theta-delta: cached levels outside their alphabet")
        sizes = np.bincount(ctx, minlength=a_ctx)
        want = {c: cnt for c, cnt, _, _ in msg.groups}
        if any(int(sizes[c]) != want.get(c, 0) for c in range(a_ctx)):
            raise CodecError("theta-delta: the cached levels' contexts do not match the message's groups")
        order = np.argsort(ctx, kind="stable")
        sym = np.empty(v.size, dtype=np.int64)
        lo = 0
        for c, cnt, hist, stream in msg.groups:
            sym[order[lo : lo + cnt]] = ans_decode_symbols(hist, stream, cnt)
            lo += cnt
        if msg.kind == "q8":
            sym = (sym + v.astype(np.int64)) % 256
        if sym.size and sym.max() > msg.total_t:
            raise CodecError("theta-delta: decoded levels outside their alphabet")
        return sym.astype(np.uint8 if msg.total_t <= 255 else np.uint16)


def _digest(d: bytes) -> bytes:
    if len(d) != 16:
        raise CodecError(f"theta-delta: digests are 16 bytes, got {len(d)}")
    return bytes(d)


__all__ = ["MAX_N", "DeltaMessage", "ThetaDeltaCodec", "conditional_entropy_bits", "marginal_entropy_bits", "theta_digest"]

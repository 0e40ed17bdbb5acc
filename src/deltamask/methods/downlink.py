"""Theta down, coded against what each client already holds (issue 9).

The server knows which theta version each client cached (``state.client_theta_version``). Per client
and round it sends the smallest admissible message (config key ``downlink``):

* ``snapshot``  theta on its own (the downlink codec's payload: counts or q8); the only choice for a
  client that holds nothing;
* ``cond``      the new levels coded conditioned on the levels of the client's version
  (:class:`~deltamask.codecs.delta.ThetaDeltaCodec`, exact);
* ``replay``    the accepted uplink payloads of the rounds the client missed; the client re-runs the
  aggregation from its cached theta (only while theta is a function of each round's counts);
* ``same``      the client is current: only the digest of the theta it must hold.

``auto`` (default) takes the smallest of snapshot, cond and replay; ``cond`` / ``replay`` take that mode
wherever it is admissible and a snapshot elsewhere; ``snapshot`` is the old behaviour (plus ``same``).

Every non-snapshot message names the version it was coded against and the one the client must end
with by their digests (BLAKE2b-128 of theta's float32 bytes); the client checks both and raises
:class:`StaleCache` on a mismatch, and the round driver re-sends that client a snapshot in the same
round. So a cache that went stale behind the server's back (a node restarted, a late Flower ClientApp
overwrote newer state) is caught instead of silently training from the wrong theta.

The server keeps, in ``state.theta_versions`` (typed :class:`~deltamask.fl.aggregation.ThetaVersion`
entries, persisted with the run state, so resume continues exactly), per version some client holds: its
levels, their kind and total, and its digest; per version produced by a replayable round: that round's
accepted uplink payloads. At most ``downlink_history`` versions are kept;
a client older than that gets a snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..codecs import CodecError, codec_of, get_codec
from ..codecs.base import Levels, ProbsCodec
from ..codecs.bundle import split_bundle
from ..codecs.delta import (
    ThetaDeltaCodec,
    conditional_entropy_bits,
    marginal_entropy_bits,
    theta_digest,
)
from ..codecs.dense import ProbsCountsCodec, theta_of_levels
from ..fl.aggregation import ServerState, ThetaVersion
from .base import ClientFailure

log = logging.getLogger("deltamask")

DOWNLINK_MODES = ("auto", "snapshot", "cond", "replay")


class StaleCache(ClientFailure):
    """The client's cached theta is not the version the server coded against (or the rebuilt theta is
    not the one the server holds). Its failure kind, ``stale-cache``, makes the round driver re-send a
    snapshot in the same round."""

    kind = "stale-cache"


#: the aggregation a replay re-runs: (theta the round started from, the round, its accepted uplink payloads)
#: -> (keep-counts, how many masks they sum)
ReplayCounts = Callable[[np.ndarray, int, list[bytes]], tuple[np.ndarray, int]]


class ThetaSync:
    """The server's and the client's side of the theta downlink of one mask method.

    It knows nothing of the method: ``n`` masked weights; ``mode`` and ``history`` (config keys
    ``downlink``, ``downlink_history``); ``snapshot_codec(exact)``, the probs codec that sends theta on its
    own (``exact``: the round's keep-counts exist); ``snapshot(state)``, that codec's payload of the
    state's theta; ``replay_counts``, the aggregation of one round's uplinks, which a replaying client
    re-runs."""

    def __init__(self, n: int, mode: str, history: int, snapshot_codec: Callable[[bool], ProbsCodec],
                 snapshot: Callable[[ServerState], bytes], replay_counts: ReplayCounts) -> None:
        if mode not in DOWNLINK_MODES:
            raise ValueError(f"unknown downlink mode {mode!r}; valid: {', '.join(DOWNLINK_MODES)}")
        self.n = n
        self.mode = mode
        self.history = history
        self.snapshot_codec = snapshot_codec
        self.snapshot = snapshot
        self.replay_counts = replay_counts
        self.codec: ThetaDeltaCodec = get_codec("theta-delta")  # type: ignore[assignment]
        self._cond_cache: dict[tuple, Any] = {}  # per (held version, new version): cond / replay payloads, entropies
        #: per client, this round's downlink statistics (read by the method's record_fields)
        self.stats: dict[int, dict[str, Any]] = {}
        self._stats_round = -1

    # --- server: versions (``state.theta_versions``) -----------------------------------------------------
    def register(self, state: ServerState, replay_parts: list[bytes] | None, round_: int) -> None:
        """Record the version just made (``state.theta_version``): digest, levels, and how to replay it."""
        v = state.theta_version
        codec = self.snapshot_codec(state.counts is not None)
        tv = state.theta_versions.setdefault(v, ThetaVersion())
        tv.digest = theta_digest(state.theta)
        lv = codec.levels(state.theta, state.counts, state.counts_total)
        if lv is not None:
            tv.levels = (lv[0], lv[1], np.ascontiguousarray(lv[2]))
        if replay_parts is not None:
            tv.replay, tv.replay_round, tv.replay_parts = b"".join(replay_parts), round_, len(replay_parts)
        self._cond_cache.clear()
        self.prune(state)

    def prune(self, state: ServerState) -> None:
        """Keep what a client may still be sent: versions some client holds, within the last ``downlink_history``
        (their digest and levels), and the replays of the rounds after the oldest of them."""
        t = state.theta_version
        oldest = t - self.history
        held = {v for v in state.client_theta_version.values() if v >= oldest} | {t}
        floor = min(held)
        for v in list(state.theta_versions):
            tv = state.theta_versions[v]
            if v <= floor:
                tv.replay, tv.replay_round, tv.replay_parts = None, None, 0
            if v not in held:
                tv.digest, tv.levels = None, None
            if tv.empty:
                del state.theta_versions[v]

    def digest(self, state: ServerState, v: int) -> bytes | None:
        tv = state.theta_versions.get(v)
        return None if tv is None else tv.digest

    def ensure_current(self, state: ServerState) -> None:
        """Register the current version if the state has none (a state written before this module existed, on
        resume: :meth:`~deltamask.methods.base.Method.resumed`); a fresh state registers version 0 in
        ``init_state``."""
        if self.digest(state, state.theta_version) is None:
            self.register(state, None, state.round)

    # --- server: one client's theta part -----------------------------------------------------------
    def theta_part(self, state: ServerState, client_id: int, round_: int) -> bytes:
        if round_ != self._stats_round:
            self.stats, self._stats_round = {}, round_
        t = state.theta_version
        if self.digest(state, t) is None:  # sending changes no state: the version was registered when it was made
            raise RuntimeError(f"theta version {t} is not registered (init_state, aggregate and resumed register it)")
        v = state.client_theta_version.get(client_id)
        snap = self.snapshot(state)
        target = self.digest(state, t)
        st: dict[str, Any] = {"snapshot_bits": 8 * len(snap)}
        if v == t:
            part, mode = self.codec.encode_same(self.n, target), "same"
            st["snapshot_bits"] = 0  # the old downlink sent nothing to a current client
            st["cond_entropy_bits"] = 0.0
        else:
            cands: dict[str, bytes] = {"snapshot": snap}
            if v is not None and self.mode in ("auto", "cond"):
                c = self._cond(state, v, t, target)
                if c is not None:
                    cands["cond"] = c
            if v is not None and self.mode in ("auto", "replay"):
                r = self._replay(state, v, t, target)
                if r is not None:
                    cands["replay"] = r
            for k in ("cond", "replay"):  # every admissible candidate's size, for the ablation's accounting
                if k in cands:
                    st[f"{k}_bits"] = 8 * len(cands[k])
            if self.mode in cands:
                mode = self.mode
            else:
                mode = min(cands, key=lambda k: len(cands[k])) if self.mode == "auto" else "snapshot"
            part = cands[mode]
            st["cond_entropy_bits"] = self._entropy(state, v, t)
        st.update(mode=mode, bits=8 * len(part), base=v)
        self.stats[client_id] = st
        return part

    def _levels(self, state: ServerState, v: int) -> Levels | None:
        tv = state.theta_versions.get(v)
        return None if tv is None else tv.levels

    def _cond(self, state: ServerState, v: int, t: int, target: bytes) -> bytes | None:
        key = (v, t)
        if key in self._cond_cache:
            return self._cond_cache[key]
        old, new, base = self._levels(state, v), self._levels(state, t), self.digest(state, v)
        out = None
        if old is not None and new is not None and base is not None and old[0] == new[0]:
            c = self.snapshot_codec(True)  # counts: the header carries stat, eps (float32) and prior, as a snapshot's does
            stat, eps, prior = (c.stat, c.eps, c.prior) if isinstance(c, ProbsCountsCodec) else ("mode", 0.0, (1.0, 1.0))
            try:
                out = self.codec.encode_cond(new[2], old[2], new[0], new[1], old[1], stat, eps, prior, base, target)
            except CodecError as e:  # e.g. q8 histograms past the container's params limit: a snapshot goes instead
                log.debug("no conditional code from version %d to %d: %s", v, t, e)
                out = None
        self._cond_cache[key] = out  # type: ignore[assignment]
        return out

    def _replay(self, state: ServerState, v: int, t: int, target: bytes) -> bytes | None:
        """The rounds v+1..t's accepted uplinks, framed once per (held, new) pair for every client that holds v."""
        key = ("replay", v, t)
        if key not in self._cond_cache:
            self._cond_cache[key] = self._replay_uncached(state, v, t, target)
        return self._cond_cache[key]

    def _replay_uncached(self, state: ServerState, v: int, t: int, target: bytes) -> bytes | None:
        base = self.digest(state, v)
        if base is None:
            return None
        rounds = []
        for u in range(v + 1, t + 1):
            tv = state.theta_versions.get(u)
            if tv is None or tv.replay is None or tv.replay_round is None:
                return None
            parts = split_bundle(tv.replay)
            if len(parts) != tv.replay_parts:
                return None
            rounds.append((tv.replay_round, parts))
        return self.codec.encode_replay(self.n, rounds, base, target)

    def _entropy(self, state: ServerState, v: int | None, t: int) -> float | None:
        """Empirical entropy (bits) of the new levels given what the client held (marginal if nothing);
        one O(N) pass per (held, new) pair, shared by the clients that hold the same version."""
        key = ("H", v, t)
        if key not in self._cond_cache:
            self._cond_cache[key] = self._entropy_uncached(state, v, t)  # type: ignore[assignment]
        return self._cond_cache[key]  # type: ignore[return-value]

    def _entropy_uncached(self, state: ServerState, v: int | None, t: int) -> float | None:
        new = self._levels(state, t)
        if new is None:
            return None
        old = self._levels(state, v) if v is not None else None
        if old is None or old[0] != new[0]:
            return marginal_entropy_bits(new[2], new[1] + 1)
        return conditional_entropy_bits(new[0], new[2], old[2], new[1] + 1, old[1] + 1)

    # --- client ------------------------------------------------------------------------------------
    def client_apply(self, part: bytes, cache: dict[str, Any]) -> bool:
        """Bring the client's cached theta to the version ``part`` describes; True when it changed.
        Raises :class:`StaleCache` when the cache is not what the server coded against."""
        codec = codec_of(part)
        if isinstance(codec, ProbsCodec):
            theta, lv = codec.decode_levels(part, expect_n=self.n)
            if theta.shape != (self.n,):
                raise ClientFailure(f"theta payload has {theta.shape[0]} entries, this model masks {self.n}")
            self._store(cache, theta, lv, theta_digest(theta))
            return True
        msg = self.codec.decode(part, expect_n=self.n)
        held = cache.get("theta")
        if held is None:
            raise StaleCache("the server sent theta against a cached version, and this client holds none")
        have = theta_digest(held)
        if have != msg.base:
            raise StaleCache(f"the server coded theta against version {msg.base.hex()[:12]}, this client holds {have.hex()[:12]}")
        if msg.mode == "same":
            return False
        if msg.mode == "cond":
            kind, total = cache.get("theta_levels_kind"), cache.get("theta_levels_total")
            levels = cache.get("theta_levels")
            if kind != msg.kind or levels is None or total is None:
                raise StaleCache(f"the cached theta has no {msg.kind} levels to decode against")
            try:
                new = self.codec.cond_levels(msg, levels, int(total))
            except CodecError as e:
                raise StaleCache(str(e)) from None
            theta = theta_of_levels(msg.kind, msg.total_t, new, msg.stat, msg.eps, msg.prior)
            lv = (msg.kind, msg.total_t, new)
        else:
            theta, lv = self._rebuild(held, msg.rounds)
        got = theta_digest(theta)
        if got != msg.target:
            raise StaleCache(f"the rebuilt theta ({got.hex()[:12]}) is not the server's ({msg.target.hex()[:12]})")
        self._store(cache, theta, lv, got)
        return True

    def _rebuild(self, theta: np.ndarray, rounds: list[tuple[int, list[bytes]]]) -> tuple[np.ndarray, Levels]:
        """Re-run the server's aggregation of the replayed rounds from ``theta`` (priors reset each round)."""
        lv: Levels | None = None
        for rnd, parts in rounds:
            counts, total = self.replay_counts(theta, rnd, parts)
            codec = self.snapshot_codec(True)
            theta = codec.reconstruct(None, counts, total)
            lv = codec.levels(theta, counts, total)
        if lv is None:
            raise StaleCache("a replay must hold at least one round of counts")
        return theta, lv

    @staticmethod
    def _store(cache: dict[str, Any], theta: np.ndarray, lv: Levels | None, digest: bytes) -> None:
        cache["theta"] = theta
        cache["theta_digest"] = digest.hex()
        if lv is None:
            for k in ("theta_levels", "theta_levels_kind", "theta_levels_total"):
                cache.pop(k, None)
        else:
            cache["theta_levels_kind"], cache["theta_levels_total"], cache["theta_levels"] = lv[0], int(lv[1]), np.asarray(lv[2])


def kl_floor_bits(theta_k: np.ndarray, theta_g: np.ndarray, chunk: int = 1 << 20) -> float:
    """``sum_i KL(Bern(theta_k,i) || Bern(theta_g,i))`` in bits (float64, in blocks): the information any
    scheme needs to convey a sample of theta_k to a receiver that knows theta_g (KLMS, Isik et al. 2024)."""
    p_all = np.asarray(theta_k).ravel()
    q_all = np.asarray(theta_g).ravel()
    total = 0.0
    tiny = 1e-12
    for lo in range(0, p_all.size, chunk):
        p = np.clip(p_all[lo : lo + chunk].astype(np.float64), tiny, 1 - tiny)
        q = np.clip(q_all[lo : lo + chunk].astype(np.float64), tiny, 1 - tiny)
        total += float(np.sum(p * np.log2(p / q) + (1 - p) * np.log2((1 - p) / (1 - q))))
    return total

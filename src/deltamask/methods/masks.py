"""FedPM, DeltaMask and linear probing.

Round structure for the mask methods (METHOD.md):

* rounds ``1..head_warmup_rounds``: federated linear probing of the head (FedAvg, dense, counted);
  features come from the backbone under the deterministic mask ``[theta_g >= 0.5]``.
* later rounds: mask training. Down: theta_g (downlink codec) and, if the client's cached head is
  stale, the head. Up: ``fedpm`` sends the sampled mask (``bitpack`` = 1 bpp, or an entropy-coded mask
  codec); ``deltamask`` sends the top-kappa of the indices where the sampled mask differs from the
  reference ``r = [theta_g >= 0.5]``, with an index-set codec. The server rebuilds each client's mask
  (``m_hat = r XOR D_hat``), aggregates Beta posteriors and re-encodes theta_g.

``linear-probe`` runs the head rounds for every round, on the unmasked backbone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ..fl import seeding
from ..fl.training import compute_features, label_log_prior, train_head, train_scores
from ..codecs import (
    CodecError,
    IndexCodec,
    MaskCodec,
    ProbsCodec,
    codec_of,
    get_codec,
    log2_binomial,
)
from ..codecs.container import unpack
from ..codecs.dense import ProbsCountsCodec, theta_from_counts
from ..codecs.fuse import FuseCodec
from ..codecs.rans import ProbsCountsRansCodec
from ..config import Config, ConfigError, client_loss_of
from ..fl.robust import Rejected, check_count, check_values, clip_fields, clip_to_median, cohort_cosines, combine, flip_outliers, trust_combine
from ..fl.aggregation import MaskAggregator, ServerState, fedavg, init_state, posterior
from .downlink import ThetaSync, kl_floor_bits
from .base import (
    Aggregation,
    ClientContext,
    ClientData,
    ClientFailure,
    Failure,
    Method,
    Reply,
    Sent,
    join_bundle,
    parts_by_kind,
)

#: From this many masked weights on, ``auto`` sends exact counts with ``probs-counts-rans``.
RANS_MIN_N = 1 << 24


def auto_counts_codec(n: int, stat: str, eps: float) -> ProbsCountsCodec:
    """The exact-counts downlink codec ``auto`` uses for a model of ``n`` masked weights."""
    return (ProbsCountsRansCodec if n >= RANS_MIN_N else ProbsCountsCodec)(stat, eps)


def _bits(b: bytes) -> int:
    return 8 * len(b)


def _compact(update: tuple[str, Any]) -> tuple[str, Any]:
    """A decoded update as held between the two passes of :meth:`MaskMethod.aggregate`: a dense filter flip
    mask as its sorted indices (members: keys plus false positives), a whole mask bit-packed."""
    kind, data = update
    if kind == "flip_mask":
        if isinstance(data, np.ndarray):
            return "flips", np.flatnonzero(data)
        import torch

        return "flips", torch.nonzero(data).flatten().cpu().numpy()
    if kind == "mask":
        return "mask", np.packbits(np.asarray(data, dtype=bool))
    return update


def reply_failure(client_id: int, what: str, e: BaseException) -> Failure:
    """One reply's typed failure: a payload that does not decode is ``malformed``; one that decodes but
    fails a check, or whose processing raised anything else, is ``rejected`` (never a crash of the run)."""
    if isinstance(e, CodecError):
        return Failure(client_id, f"malformed {what}: {e}", "malformed")
    if isinstance(e, Rejected):
        return Failure(client_id, f"rejected {what}: {e}", "rejected")
    return Failure(client_id, f"rejected {what}: {type(e).__name__}: {e}", "rejected")


class _HeadRounds(Method):
    """Federated linear probing of the head on fixed features (FedAvg)."""

    #: the server's root set (``root_samples``; FLTrust): labelled prefix outputs no client holds, set by the
    #: round driver from the experiment. None: heads are combined by ``clip_factor`` / ``robust_mean``.
    root: ClientData | None = None
    _root_feats: tuple[Any, torch.Tensor] | None = None

    def feature_mask(self, theta: np.ndarray | None) -> torch.Tensor | None:
        return None

    def head_round_downlink(self, state: ServerState, client_id: int) -> list[bytes]:
        return self.head_downlink_part(state, client_id)

    def head_round_client(self, parts: dict[str, bytes], data: ClientData, ctx: ClientContext, theta_key: Any, theta: np.ndarray | None) -> Reply:
        w, b = self.client_head(parts, ctx)
        key = ("features", theta_key)
        feats = data.cache.get(key)
        if feats is None:
            data.cache.clear()
            feats = compute_features(self.net, data.h, self.feature_mask(theta))
            data.cache[key] = feats
        dev = self.net.scores.device
        w2, b2, loss = train_head(
            torch.from_numpy(w).to(dev),
            torch.from_numpy(b).to(dev),
            feats,
            data.y,
            epochs=self.cfg.head_epochs,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.head_lr,
            shuffle_gen=seeding.generator(ctx.seed, ctx.round, ctx.client_id, "shuffle"),
            log_prior=self.log_prior(data),
        )
        payload = self.encode_head(w2.cpu().numpy(), b2.cpu().numpy())
        return Reply(ctx.client_id, payload, data.num_samples, {"train_loss": loss})

    def log_prior(self, data: ClientData) -> torch.Tensor | None:
        """The client's log label frequencies for ``client_loss=balanced`` (None: plain cross-entropy)."""
        if client_loss_of(self.cfg) != "balanced":
            return None
        return label_log_prior(data.y, self.net.head.out_features)

    def root_head(self, state: ServerState, round_: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The server's own head for this round (None without a root set): trained on the root set from the
        current global head with the clients' recipe (``head_epochs``, ``head_lr``, ``batch_size``, the
        client loss), on features under the deterministic mask ``[theta_g >= 0.5]`` (where the round
        started), with a shuffle seeded by (seed, round, "root"): a resumed run trains the same head."""
        root = self.root
        if root is None:
            return None
        key = (state.theta_version, id(root))
        if self._root_feats is None or self._root_feats[0] != key:
            self._root_feats = (key, compute_features(self.net, root.h, self.feature_mask(state.theta)))
        dev = self.net.scores.device
        w, b, _ = train_head(
            torch.from_numpy(state.head_weight).to(dev),
            torch.from_numpy(state.head_bias).to(dev),
            self._root_feats[1],
            root.y,
            epochs=self.cfg.head_epochs,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.head_lr,
            shuffle_gen=seeding.generator(self.cfg.seed, round_, -1, "root"),
            log_prior=self.log_prior(root),
        )
        return w.cpu().numpy(), b.cpu().numpy()

    def head_round_aggregate(self, state: ServerState, replies: list[Reply], round_: int) -> Aggregation:
        heads, weights, ids, dropped = [], [], [], []
        for r in replies:
            try:
                heads.append(self.checked_head(r.payload))
                weights.append(r.num_samples if self.cfg.weighted else 1.0)
                ids.append(r.client_id)
            except Exception as e:  # noqa: BLE001 - one reply never ends the run
                dropped.append(reply_failure(r.client_id, "head payload", e))
        agg = Aggregation("head", len(heads), dropped)
        if len(heads) < self.cfg.min_replies:
            agg.skipped = True
            return agg
        agg.clients = self.combine_heads(state, heads, weights, ids, root=self.root_head(state, round_))
        if all(c.get("distrusted") for c in agg.clients):  # no head earned the server's trust: it stays
            agg.skipped = True
            return agg
        state.head_version += 1
        return agg

    def checked_head(self, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
        """A client's head, decoded and checked: every entry finite and within ``max_abs_param``."""
        w, b = self.decode_head(payload)
        check_values(w, self.cfg.max_abs_param, "head weight")
        check_values(b, self.cfg.max_abs_param, "head bias")
        return w, b

    def combine_heads(self, state: ServerState, heads: list[tuple[np.ndarray, np.ndarray]], weights: list[float], ids: list[int],
                      step: float = 1.0, root: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
        """The new global head from the clients' heads: each client's weight and bias updates norm-clipped,
        each to ``clip_factor`` times the round's median of that tensor's update norms (a bias pushed hard
        is clipped against the other biases, not hidden in the weight matrix's larger norm), then combined by
        ``robust_mean``; with ``step`` < 1 the global head moves only that fraction of the way there (a server
        step size). With the server's own head ``root`` (a root set): FLTrust instead (:meth:`trust_heads`).
        Returns the per-client record (update norms, the scales where clipped, the trust, and ``cohort_cos``:
        the cosine of the client's update, less its mean over classes, to the round's coordinate-wise median
        of those updates; reported only, it changes no result)."""
        cfg = self.cfg
        old_w, old_b = state.head_weight, state.head_bias
        updates = [_centred_update(w, b, old_w, old_b) for w, b in heads]  # compared by the report and by the trust rule
        cohort = cohort_cosines(updates)
        if root is not None:
            recs = self.trust_heads(state, updates, weights, ids, _centred_update(*root, old_w, old_b))
        else:
            ws, nw, sw = clip_to_median([h[0] for h in heads], state.head_weight, cfg.clip_factor)
            bs, nb, sb = clip_to_median([h[1] for h in heads], state.head_bias, cfg.clip_factor)
            if cfg.robust_mean == "mean":  # where nothing is clipped, exactly the plain FedAvg of the heads as sent
                state.head_weight, state.head_bias = fedavg(ws, weights), fedavg(bs, weights)
            else:
                flat = [_flat_head(w, b) for w, b in zip(ws, bs)]
                value = combine(_flat_head(state.head_weight, state.head_bias), flat, weights, cfg.robust_mean, cfg.trim_fraction, 0.0).value
                state.head_weight, state.head_bias = _split_head(value, state.head_weight.shape)
            recs = [{"client": cid, "update_norm": float(np.hypot(a, b_)), "weight_norm": a, "bias_norm": b_,
                     **clip_fields([("weight update", a, x), ("bias update", b_, y)])}
                    for cid, a, b_, x, y in zip(ids, nw, nb, sw, sb)]
        if step != 1.0:  # exactly the combined head at 1 (a head no client moved stays exactly)
            s32 = np.float32(step)
            state.head_weight = (old_w + s32 * (state.head_weight - old_w)).astype(np.float32)
            state.head_bias = (old_b + s32 * (state.head_bias - old_b)).astype(np.float32)
        if cohort is not None:
            for rec, cos in zip(recs, cohort):
                rec["cohort_cos"] = cos
        return recs

    def trust_heads(self, state: ServerState, updates: list[np.ndarray], weights: list[float], ids: list[int],
                    root_update: np.ndarray) -> list[dict[str, Any]]:
        """FLTrust over the clients' head updates (weight and bias as one vector, centred over classes by
        :func:`_centred_update`) against the server's root-set head's update, the same way centred
        (:func:`~deltamask.fl.robust.trust_combine`); a client whose update points away from the server's gets
        weight 0 and the reason in its record. Where none is trusted the head stays."""
        base = _flat_head(state.head_weight, state.head_bias).astype(np.float64)
        tr = trust_combine(base, [base + u for u in updates], base + root_update, weights)
        if tr.value is not None:
            state.head_weight, state.head_bias = _split_head(tr.value, state.head_weight.shape)
        out = []
        for cid, cos, t, n in zip(ids, tr.cosines, tr.trust, tr.norms):
            rec: dict[str, Any] = {"client": cid, "update_norm": n, "trust": t, "trust_cos": cos, "root_norm": tr.root_norm}
            if t <= 0:
                rec["distrusted"] = (f"head update at cosine {cos:.3f} to the server's root-set update (root_samples="
                                     f"{self.cfg.root_samples}): weight 0")
            out.append(rec)
        return out


def _flat_head(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A head as one vector: the weight's rows, then the bias."""
    return np.concatenate([w.reshape(-1), b.reshape(-1)])


def _centred_update(w: np.ndarray, b: np.ndarray, w0: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """A head's update from (``w0``, ``b0``), flattened (float64), less its mean over classes: adding one
    vector to every class row (and one number to every bias) changes no softmax, and Adam puts a large such
    common part into every update from the same start, so only the rest says where a client pulls."""
    dw = w.astype(np.float64) - w0.astype(np.float64)
    db = b.astype(np.float64) - b0.astype(np.float64)
    dw -= dw.mean(axis=0, keepdims=True)
    db -= db.mean()
    return _flat_head(dw, db)


def _split_head(value: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_flat_head` undone: (weight of ``shape``, bias), each its own array."""
    c, d = shape
    return value[: c * d].reshape(c, d).copy(), value[c * d :].copy()


class LinearProbe(_HeadRounds):
    name = "linear-probe"
    description = "FedAvg of a linear head on the frozen backbone (dense fp32 head both ways)"

    def send(self, state: ServerState, client_id: int, round_: int) -> Sent:
        return Sent(join_bundle(self.head_round_downlink(state, client_id)), head_version=state.head_version)

    def client_update(self, downlink: bytes, data: ClientData, ctx: ClientContext) -> Reply:
        return self.head_round_client(parts_by_kind(downlink), data, ctx, None, None)

    def aggregate(self, state: ServerState, replies: list[Reply], round_: int) -> Aggregation:
        return self.head_round_aggregate(state, replies, round_)


class MaskMethod(_HeadRounds):
    """Shared machinery of FedPM and DeltaMask."""

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        self._theta_payload: tuple[int, bytes] | None = None
        # auto: exact counts go down with constriction's ANS for small models (0.03 s to decode the default
        # experiment's 2.2M) and with our rANS coder from 2^24 weights on, where constriction's ~14 ns per
        # symbol shows (issue 13: 1.2 s for 86M) and rANS's ~60 extra header bytes are < 0.01% of the
        # payload; an explicit counts codec is kept
        self.counts_codec: ProbsCountsCodec = auto_counts_codec(self.n, cfg.posterior, cfg.eps)
        if cfg.downlink_codec == "auto":
            self.down_codec = None
        else:
            self.down_codec = get_codec(cfg.downlink_codec, kind="probs")
            if isinstance(self.down_codec, ProbsCountsCodec):
                self.down_codec = self.counts_codec = type(self.down_codec)(cfg.posterior, cfg.eps)
                if cfg.reset_every != 1 or cfg.weighted or cfg.posterior_memory > 0:
                    raise ConfigError(f"downlink_codec={cfg.downlink_codec} needs reset_every=1 and weighted=false "
                                      "(theta must be a function of counts)")
        self.sync = ThetaSync(self.n, cfg.downlink, cfg.downlink_history, self._theta_codec, self.theta_payload, self._replay_counts)

    def uses_masks(self) -> bool:
        return True

    @property
    def keeps_posterior(self) -> bool:
        """Whether alpha/beta carry over to the next round (priors not reset every round, or a memory)."""
        return self.cfg.reset_every != 1 or self.cfg.posterior_memory > 0

    def round_prior(self, state: ServerState) -> ServerState:
        """The state the round's posterior starts from: with ``posterior_memory`` m, the earlier evidence
        decayed towards Beta(1, 1), ``alpha = 1 + m (alpha - 1)`` and the same for beta (float32)."""
        m = self.cfg.posterior_memory
        if m <= 0 or state.alpha is None or state.beta is None:
            return state
        one, m32 = np.float32(1.0), np.float32(m)
        alpha = (one + m32 * (state.alpha - one)).astype(np.float32)
        beta = (one + m32 * (state.beta - one)).astype(np.float32)
        return dataclasses.replace(state, alpha=alpha, beta=beta)

    def init_state(self) -> ServerState:
        w = self.net.head.weight.detach().cpu().numpy()
        b = self.net.head.bias.detach().cpu().numpy()
        # alpha/beta only where a later round reads them: priors not reset every round
        state = init_state(self.n, self.cfg.theta0, w, b, posterior_params=self.keeps_posterior)
        # From the first round on, theta_g is what the clients decode (q8 of theta0 is not theta0).
        state.theta = self._theta_codec(state.counts is not None).reconstruct(state.theta, None, None)
        self.sync.register(state, None, 0)
        return state

    def resumed(self, state: ServerState) -> None:
        self.sync.ensure_current(state)  # a state from before the typed theta history: its current version

    def server_device(self) -> Any:
        """Where the server aggregates: the run's CUDA device when it has one, else numpy on the CPU."""
        dev = self.net.scores.device
        return dev if dev.type == "cuda" else None

    def is_head_round(self, round_: int) -> bool:
        return round_ <= self.cfg.head_warmup_rounds

    def feature_mask(self, theta: np.ndarray | None) -> torch.Tensor | None:
        return None if theta is None else torch.from_numpy(theta >= 0.5)

    def eval_mask(self, state: ServerState) -> torch.Tensor | None:
        return torch.from_numpy(state.theta >= 0.5)

    # --- downlink ------------------------------------------------------------------------------------
    def theta_payload(self, state: ServerState) -> bytes:
        if self._theta_payload is None or self._theta_payload[0] != state.theta_version:
            self._theta_payload = (state.theta_version, self._encode_theta(state))
        return self._theta_payload[1]

    def _theta_codec(self, exact: bool) -> ProbsCodec:
        """The downlink codec of theta: the configured one, or (auto) counts when exact, else q8."""
        if self.down_codec is not None:
            return self.down_codec  # type: ignore[return-value]
        return self.counts_codec if exact else get_codec("probs-q8", kind="probs")  # type: ignore[return-value]

    def _replay_counts(self, theta: np.ndarray, round_: int, parts: list[bytes]) -> tuple[np.ndarray, int]:
        """The keep-counts of one round's accepted uplinks, decoded against the theta it started from
        (what a client replaying missed rounds re-runs; priors reset every round, unweighted)."""
        tmp = ServerState(round=round_ - 1, theta=theta, alpha=None, beta=None, head_weight=np.zeros((1, 1), np.float32),
                          head_bias=np.zeros(1, np.float32))
        agg = MaskAggregator(tmp, round_, 1, False, device=self.server_device())
        for p in parts:
            (kind, data), _ = self.decode_update(p, theta)
            {"flips": agg.add_flips, "flip_mask": agg.add_flip_mask}.get(kind, agg.add)(data, 1.0)
        return agg.counts(), agg.total

    def _encode_theta(self, state: ServerState) -> bytes:
        codec = self._theta_codec(state.counts is not None)
        return codec.encode(state.theta, state.counts, state.counts_total if state.counts is not None else None)

    def send(self, state: ServerState, client_id: int, round_: int) -> Sent:
        """theta as the smallest admissible message against the client's cached version (``downlink``:
        snapshot, cond, replay, or only the digest when it is current), then the head if stale."""
        parts = [self.sync.theta_part(state, client_id, round_)]
        parts += self.head_downlink_part(state, client_id)
        return Sent(join_bundle(parts), theta_version=state.theta_version, head_version=state.head_version)

    def _client_theta(self, parts: dict[str, bytes], ctx: ClientContext) -> np.ndarray:
        part = parts.get("probs") or parts.get("delta")
        if part is not None and self.sync.client_apply(part, ctx.state):
            ctx.state["theta_seq"] = ctx.state.get("theta_seq", 0) + 1
        if "theta" not in ctx.state:
            raise ClientFailure("no theta received and none cached (client state lost?)")
        return ctx.state["theta"]

    # --- client --------------------------------------------------------------------------------------
    def client_update(self, downlink: bytes, data: ClientData, ctx: ClientContext) -> Reply:
        parts = parts_by_kind(downlink)
        theta_g = self._client_theta(parts, ctx)
        if self.is_head_round(ctx.round):
            return self.head_round_client(parts, data, ctx, ctx.state["theta_seq"], theta_g)
        w, b = self.client_head(parts, ctx)
        dev = self.net.scores.device
        with torch.no_grad():
            self.net.head.weight.copy_(torch.from_numpy(w))
            self.net.head.bias.copy_(torch.from_numpy(b))
        theta_t = torch.from_numpy(theta_g).to(dev)
        res = train_scores(
            self.net,
            theta_t,
            data.h,
            data.y,
            epochs=self.cfg.local_epochs,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.lr,
            eps=self.cfg.eps,
            shuffle_gen=seeding.generator(ctx.seed, ctx.round, ctx.client_id, "shuffle"),
            mask_gen=seeding.generator(ctx.seed, ctx.round, ctx.client_id, "mask-train", dev),
            train_head=self.cfg.train_head,
            head_lr=self.cfg.head_lr,
            log_prior=self.log_prior(data),
        )
        g = seeding.generator(ctx.seed, ctx.round, ctx.client_id, "mask-sample", dev)
        theta_k = res.theta
        m_k = (torch.rand(theta_k.shape, generator=g, device=dev) < theta_k).cpu().numpy()
        theta_k_np = theta_k.cpu().numpy()
        payload, metrics = self.encode_mask(m_k, theta_k_np, theta_g, ctx)
        metrics["train_loss"] = res.loss
        # simulator truth (never counted as payload): the KL floor of conveying a sample of theta_k to theta_g
        metrics["kl_floor_bits"] = kl_floor_bits(theta_k_np, theta_g)
        parts_up = [payload]
        if self.cfg.train_head:
            parts_up.append(self.encode_head(self.net.head.weight.detach().cpu().numpy(), self.net.head.bias.detach().cpu().numpy()))
        return Reply(ctx.client_id, join_bundle(parts_up), data.num_samples, metrics)

    def encode_mask(self, m_k: np.ndarray, theta_k: np.ndarray, theta_g: np.ndarray, ctx: ClientContext) -> tuple[bytes, dict[str, float]]:
        raise NotImplementedError

    def decode_update(self, payload: bytes, theta_g: np.ndarray) -> tuple[tuple[str, Any], dict[str, float]]:
        """One client's mask as the aggregator takes it, and its statistics: ``("flips", indices)``
        (sorted indices where it differs from the reference ``[theta_g >= 0.5]``), ``("flip_mask",
        bool[N])`` (the same, dense) or ``("mask", bool[N])`` (the mask itself)."""
        raise NotImplementedError

    # --- server --------------------------------------------------------------------------------------
    def aggregate(self, state: ServerState, replies: list[Reply], round_: int) -> Aggregation:
        if self.is_head_round(round_):
            return self.head_round_aggregate(state, replies, round_)
        self._agg_round = round_
        # pass 1: decode and check every reply; nothing touches the state yet
        decoded: list[tuple[Reply, bytes, tuple[str, Any], dict[str, Any], Any]] = []
        dropped: list[Failure] = []
        flips: dict[int, int] = {}
        caps: dict[int, int | None] = {}
        ref: list[np.ndarray] = []  # [theta_g >= 0.5], computed once if a dense mask needs it
        for r in replies:
            try:
                parts = parts_by_kind(r.payload)
                mask_part = parts.get("indices") or parts.get("mask")
                if mask_part is None:
                    raise CodecError("reply holds no mask payload")
                update, stats = self.decode_update(mask_part, state.theta)
                head = None
                if self.cfg.train_head:
                    if "array" not in parts:
                        raise CodecError("train_head is on but the reply holds no head")
                    head = self.checked_head(parts["array"])
                if "num_keys" in r.metrics and "num_members" in stats:  # reporting only (false positives, the bound)
                    keys = check_count("num_keys", r.metrics["num_keys"], self.n)
                    stats["false_positives"] = stats["num_members"] - keys
                    stats["bound_bits"] = log2_binomial(self.n, keys)
                    stats["num_keys"] = keys
                flips[r.client_id] = self.flip_count(update, ref, state.theta)
                caps[r.client_id] = self.flip_cap(round_, codec_of(mask_part).lossy)
                update = _compact(update)  # held until pass 2: indices or packed bits, not K dense masks
            except Exception as e:  # noqa: BLE001 - one reply never ends the run
                dropped.append(reply_failure(r.client_id, "payload", e))
                continue
            decoded.append((r, mask_part, update, stats, head))
        outliers = flip_outliers(flips, self.n, caps, self.cfg.flip_outlier, self.flip_cap_name())
        # pass 2: the accepted replies, in their order, into the posterior
        reset_every = 0 if self.cfg.posterior_memory > 0 else self.cfg.reset_every
        agg = MaskAggregator(self.round_prior(state), round_, reset_every, self.cfg.weighted, device=self.server_device())
        per_client: list[dict[str, Any]] = []
        accepted_parts: list[bytes] = []
        heads, head_w, head_ids = [], [], []
        for r, mask_part, update, stats, head in decoded:
            if r.client_id in outliers:
                dropped.append(Failure(r.client_id, f"rejected payload: {outliers[r.client_id]}", "rejected"))
                continue
            kind, data = update
            try:  # each add checks its input before it changes the counts
                if kind == "flips":  # filters' flip masks too (_compact)
                    agg.add_flips(data, r.num_samples)
                else:
                    agg.add(np.unpackbits(data, count=self.n).astype(bool), r.num_samples)
            except Exception as e:  # noqa: BLE001 - one reply never ends the run
                dropped.append(reply_failure(r.client_id, "payload", e))
                continue
            stats.update({"client": r.client_id, "bits": _bits(r.payload), "bpp": _bits(r.payload) / self.n, "codec": codec_of(mask_part).name,
                          "flips": flips[r.client_id]})
            if "kl_floor_bits" in r.metrics:
                stats["kl_floor_bits"] = float(r.metrics["kl_floor_bits"])
            per_client.append(stats)
            accepted_parts.append(mask_part)
            if head is not None:
                heads.append(head)
                head_w.append(r.num_samples if self.cfg.weighted else 1.0)
                head_ids.append(r.client_id)
        info = Aggregation("mask", len(per_client), dropped, clients=per_client)
        if len(per_client) < self.cfg.min_replies:
            info.skipped = True
            return info
        # the server's own head on its root set (train_head), from the state the round started from (still
        # untouched here), and only where there are heads to weigh
        root = self.root_head(state, round_) if heads else None
        exact = agg.counts_exact
        counts = agg.counts() if exact else None
        total = agg.total if exact else 0
        codec = self._theta_codec(exact)
        alpha = beta = theta = None
        if self.keeps_posterior or not exact:
            alpha, beta = agg.finish()
        if exact and not isinstance(codec, ProbsCountsCodec):
            theta = theta_from_counts(counts, total, self.cfg.posterior, self.cfg.eps)  # = posterior(1 + c, 1 + K - c)
        elif not exact:
            theta = posterior(alpha, beta, self.cfg.posterior, self.cfg.eps)
        del agg
        # alpha/beta stay only where the next round continues them (priors not reset every round)
        keep = self.keeps_posterior
        state.alpha, state.beta = (alpha, beta) if keep else (None, None)
        state.counts, state.counts_total = counts, total
        state.theta_version += 1
        # What the clients will decode is the global model: make the server use exactly that (computed
        # directly, as decode(encode(.)) would give it; the payload is encoded at the first downlink).
        state.theta = codec.reconstruct(theta, counts, total if exact else None)
        # a client that missed this round can rebuild its result from these payloads while theta is a
        # function of the round's counts alone (priors reset every round, unweighted, a counts codec)
        replayable = exact and not self.keeps_posterior and not self.cfg.weighted and isinstance(codec, ProbsCountsCodec)
        self.sync.register(state, accepted_parts if replayable else None, round_)
        if heads:
            recs = self.combine_heads(state, heads, head_w, head_ids, self.cfg.head_server_lr, root=root)
            for rec in recs:
                stats = next(c for c in per_client if c["client"] == rec["client"])
                stats.update({f"head_{k}" if k != "client" else k: v for k, v in rec.items()})
            if not all(r.get("distrusted") for r in recs):  # else no head earned the server's trust: it stays
                state.head_version += 1
        return info

    def flip_cap(self, round_: int, lossy: bool = False) -> int | None:
        """The most mask entries one reply may flip in ``round_`` (None: no cap for this method); ``lossy``:
        the reply is a filter, whose members include false positives."""
        return None

    def flip_cap_name(self) -> str:
        return "max_flip_fraction"

    @staticmethod
    def flip_count(update: tuple[str, Any], ref: list[np.ndarray], theta: np.ndarray) -> int:
        """How many mask entries a decoded update flips against the reference ``[theta_g >= 0.5]``
        (``ref``: a one-element cache of it, filled on first use)."""
        kind, data = update
        if kind == "flips":
            return int(len(data))
        if kind == "flip_mask":
            return int(data.sum()) if not isinstance(data, np.ndarray) else int(np.count_nonzero(data))
        if not ref:
            ref.append(theta >= 0.5)
        return int(np.count_nonzero(np.asarray(data) != ref[0]))

    def downlink_fields(self) -> dict[str, Any]:
        """This round's theta downlink: the mode each client got, what a snapshot-only downlink would have
        sent (bpp per selected client; nothing to a current client), and the empirical entropy of the new
        levels given what each client held (the conditional code's floor)."""
        st = self.sync.stats
        if not st:
            return {}
        modes: dict[str, int] = {}
        for s in st.values():
            modes[s["mode"]] = modes.get(s["mode"], 0) + 1
        out: dict[str, Any] = {
            "downlink_modes": dict(sorted(modes.items())),
            "downlink_theta_bpp": float(np.mean([s["bits"] for s in st.values()])) / self.n,
            "downlink_snapshot_bpp": float(np.mean([s["snapshot_bits"] for s in st.values()])) / self.n,
        }
        # per client (id: bits) what each policy would have sent: snapshot-only, cond / replay where admissible
        out["downlink_candidates"] = {str(c): {k: s[k] for k in ("mode", "bits", "snapshot_bits", "cond_bits", "replay_bits") if k in s}
                                      for c, s in sorted(st.items())}
        ent = [s["cond_entropy_bits"] for s in st.values() if s.get("cond_entropy_bits") is not None]
        if len(ent) == len(st):
            out["downlink_cond_entropy_bpp"] = float(np.mean(ent)) / self.n
        return out

    def record_fields(self, agg: Aggregation, replies: list[Reply]) -> dict[str, Any]:
        """Filter false positives (simulator truth), bits per key, keys sent and kappa."""
        out: dict[str, Any] = self.downlink_fields()
        if not agg.clients:
            return out
        fps = [c["false_positives"] for c in agg.clients if "false_positives" in c]
        out["false_positives"] = int(sum(fps)) if fps else 0
        bpk = [c["bits_per_key"] for c in agg.clients if "bits_per_key" in c]
        if bpk:
            out["bits_per_key"] = float(np.mean(bpk))
        keys = [c["num_keys"] for c in agg.clients if "num_keys" in c]
        if keys:
            out["mean_keys"] = float(np.mean(keys))
        kappa = self.round_kappa(agg)
        if kappa is not None:
            out["kappa"] = kappa
        return out

    def round_kappa(self, agg: Aggregation) -> float | None:
        """kappa of the round just aggregated, from the server's own config (None: not a DeltaMask round)."""
        return None


class FedPM(MaskMethod):
    name = "fedpm"
    description = "FedPM (Isik et al., ICLR 2023): the sampled mask, bit-packed (1 bpp) or entropy-coded"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        name = "bitpack" if cfg.codec == "auto" else cfg.codec  # FedPM's own uplink is the raw mask
        if name not in _mask_codec_names():
            raise ConfigError(f"config key 'codec': fedpm sends a mask; use one of {', '.join(_mask_codec_names())} (got {cfg.codec!r})")
        self.mask_codec: MaskCodec = get_codec(name, kind="mask")  # type: ignore[assignment]

    def encode_mask(self, m_k, theta_k, theta_g, ctx):  # type: ignore[no-untyped-def]
        return self.mask_codec.encode(m_k, probs=theta_g), {"ones": float(m_k.sum())}

    def decode_update(self, payload, theta_g):  # type: ignore[no-untyped-def]
        codec = codec_of(payload)
        if codec.name != self.mask_codec.name:
            raise CodecError(f"fedpm expects a {self.mask_codec.name} mask payload, got {codec.name}")
        m = codec.decode(payload, probs=theta_g, expect_n=self.n)
        if m.shape != (self.n,):
            raise CodecError(f"mask has {m.shape[0]} entries, expected {self.n}")
        return ("mask", m), {"bound_bits": float(np.sum(_bernoulli_bits(m, theta_g)))}


def _mask_codec_names() -> list[str]:
    from ..codecs import available_codecs

    return available_codecs("mask")


def _bernoulli_bits(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return -np.where(m, np.log2(p), np.log2(1 - p))


def rank_scores(theta_k: np.ndarray, theta_g: np.ndarray, how: str, eps: float) -> np.ndarray:
    """What top-kappa ranks the delta by (largest first): the probability change, or the change of the
    logits (clipped to [eps, 1 - eps], as the scores are), which weighs moves near 0 and 1 more."""
    if how == "change":
        return np.abs(theta_k - theta_g)
    k = np.clip(theta_k.astype(np.float64), eps, 1 - eps)
    g = np.clip(theta_g.astype(np.float64), eps, 1 - eps)
    return np.abs(np.log(k / (1 - k)) - np.log(g / (1 - g)))


def kappa_at(cfg: Config, mask_round: int, mask_rounds: int) -> float:
    """DeltaMask's kappa for the ``mask_round``-th mask-training round (1-based) of ``mask_rounds``: constant, or
    cosine from ``kappa`` to ``kappa_min``."""
    if cfg.kappa_schedule == "constant" or mask_rounds <= 1:
        return cfg.kappa
    t = (mask_round - 1) / (mask_rounds - 1)
    return cfg.kappa_min + 0.5 * (cfg.kappa - cfg.kappa_min) * (1 + math.cos(math.pi * t))


class DeltaMask(MaskMethod):
    name = "deltamask"
    description = "DeltaMask (Tsouvalas et al., BigData 2024): top-kappa mask deltas as a sparse index set"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        self.index_codec: IndexCodec = get_codec(cfg.codec, kind="indices")  # type: ignore[assignment]

    def mask_rounds(self) -> int:
        return max(self.cfg.rounds - self.cfg.head_warmup_rounds, 1)

    def kappa_of(self, round_: int) -> float:
        """kappa in round ``round_`` of the run (the schedule counts the mask rounds after the head warm-up)."""
        return kappa_at(self.cfg, round_ - self.cfg.head_warmup_rounds, self.mask_rounds())

    def flip_cap(self, round_: int, lossy: bool = False) -> int | None:
        """``floor(max_flip_fraction * N)``, or by default (0) the protocol's own bound: an honest client sends
        ``ceil(kappa * |delta|)`` of its ``|delta| <= N`` changed bits, so never more than ``ceil(kappa * N)``;
        for a filter (``lossy``) plus its false positives."""
        if self.cfg.max_flip_fraction > 0:
            return int(math.floor(self.cfg.max_flip_fraction * self.n))
        kappa = self.kappa_of(round_)
        cap = int(math.ceil(kappa * self.n))
        # a filter's members are its keys plus false positives (rate 2^-fp_bits of the other N - k): allow
        # their expectation plus 8 standard deviations
        fp = max((2.0 ** -c.fp_bits for c in getattr(self.index_codec, "codecs", [self.index_codec]) if c.lossy), default=0.0)
        if fp and lossy:
            mean = fp * (self.n - cap)
            cap += int(math.ceil(mean + 8 * math.sqrt(mean) + 1))
        return cap

    def flip_cap_name(self) -> str:
        return "max_flip_fraction" if self.cfg.max_flip_fraction > 0 else "ceil(kappa * N), the protocol's bound"

    def round_kappa(self, agg: Aggregation) -> float | None:
        if agg.phase != "mask" or not agg.clients:
            return None
        return self.kappa_of(getattr(self, "_agg_round", 0))

    def encode_mask(self, m_k, theta_k, theta_g, ctx):  # type: ignore[no-untyped-def]
        ref = theta_g >= 0.5
        delta = np.flatnonzero(m_k != ref)
        kappa = self.kappa_of(ctx.round)
        keep = int(math.ceil(kappa * delta.size))
        change = rank_scores(theta_k[delta], theta_g[delta], self.cfg.kappa_rank, self.cfg.eps)
        order = np.argsort(-change, kind="stable")[:keep]
        kept = np.sort(delta[order])
        seed = seeding.derive_seed(ctx.seed, ctx.round, ctx.client_id, "filter-seed")
        payload = self.index_codec.encode(kept, self.n, seed=seed)
        return payload, {"num_keys": float(kept.size), "delta_size": float(delta.size), "kappa": kappa}

    def decode_update(self, payload, theta_g):  # type: ignore[no-untyped-def]
        """The client's mask is ``m_hat = [theta_g >= 0.5] XOR D_hat``: exact codecs give ``D_hat`` as its
        k indices (O(k + payload), never N); filters answer membership only, so their ``D_hat`` is a
        query of all N indices (dense, O(N); on the server's CUDA device when it has one)."""
        codec = codec_of(payload)
        allowed = [c.name for c in getattr(self.index_codec, "codecs", [self.index_codec])]  # auto: its candidates
        if codec.name not in allowed:
            raise CodecError(f"deltamask expects an index set written by {' or '.join(allowed)} (config key 'codec'), got {codec.name}")
        n = unpack(payload).n
        if n != self.n:
            raise CodecError(f"index set is over n={n}, expected {self.n}")
        dev = self.server_device()
        if isinstance(codec, FuseCodec) and dev is not None:
            update = ("flip_mask", codec.decode_mask_torch(payload, dev, expect_n=self.n))
            k = int(update[1].sum())
        elif codec.lossy:
            update = ("flip_mask", codec.decode_mask(payload, expect_n=self.n))
            k = int(np.count_nonzero(update[1]))
        else:
            update = ("flips", codec.decode(payload, expect_n=self.n))
            k = int(update[1].size)
        return update, {"num_members": float(k), "bound_bits": log2_binomial(self.n, k), "bits_per_key": _bits(payload) / max(k, 1)}

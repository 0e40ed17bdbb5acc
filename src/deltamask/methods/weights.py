"""Weight-training baselines: the machinery they share (``WeightMethod``).

Every weight-training baseline trains the *same* scalars DeltaMask masks (the maskable set of ``N``
weights, :class:`~deltamask.model.masking.MaskedNetwork`), additively: the network computes with
``W + dW``, where ``dW = to_delta(v)`` is a function of a trainable vector ``v`` of length ``P``
(``P = N`` and ``dW = v`` for full fine-tuning; LoRA factors for ``lora``).

Round structure (same as the mask methods):

* rounds ``1..head_warmup_rounds``: federated linear probing of the head on the backbone (FedAvg,
  dense, counted), exactly as ``deltamask``/``fedpm`` do; ``v`` stays at ``v0``.
* later rounds, head frozen: each selected client brings its copy of ``v`` up to date (see *Sync*),
  trains ``v`` for ``local_epochs`` with Adam (``weight_lr``), and uploads its update ``u = v_k - v_g``
  through the method's compressor (error-feedback buffers live in ``ClientContext.state``). The
  server decodes the replies, forms the global update ``G`` (mean of the estimates, or the method's
  own rule, e.g. majority vote), encodes ``G`` with the method's downlink codec and applies the
  *decoded* ``G`` to ``v_g``, so server and clients hold bit-identical ``v_g``.

Sync (downlink). ``v_g`` has a version (``ServerState.theta_version``; which version each client holds:
``ServerState.client_theta_version``). Every client can compute ``v0`` (version 0) itself. A client
that holds version ``a < b`` (current) receives either the encoded global updates ``a+1..b`` (kept in
``state.extra["hist:<version>"]``, as sent) or, when those would be larger or are no longer kept, the
dense ``v_g`` as float32 (exact) — whichever is smaller. A client that was in the previous round
therefore receives exactly one global update; a client that has never been selected receives the
dense ``v_g`` (32 bits per trained scalar). Every byte of that is counted as downlink.

Downlink message: ``i64`` manifest ``[head_parts, mode, from_version, to_version, sync_parts]``
(``mode`` 0 = nothing, 1 = updates, 2 = dense ``v_g``), then the head (if the client's copy is stale),
then the sync parts. Uplink message: one container, the method's compressed update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..fl import seeding
from ..fl.training import run_epochs
from ..codecs import CodecError, codec_of, get_codec
from ..codecs.container import OVERHEAD_BYTES
from ..config import ConfigError
from ..fl.robust import check_values, clip_fields, clip_to_median, combine
from ..fl.aggregation import ServerState, fedavg
from .base import Aggregation, ClientContext, ClientData, ClientFailure, Reply, Sent, join_bundle, split_bundle
from .masks import _HeadRounds, reply_failure

MODE_NONE, MODE_UPDATES, MODE_DENSE = 0, 1, 2
V_KEY = "v"
HIST_PREFIX = "hist:"


def _bits(b: bytes) -> int:
    return 8 * len(b)


class WeightMethod(_HeadRounds):
    """Head warm-up, then training of the maskable weights (or adapters of them) with a compressed uplink."""

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        if not cfg.weight_lr > 0:
            raise ConfigError("config key 'weight_lr': must be > 0")
        self.f32 = get_codec("f32", kind="array")
        self.manifest = get_codec("i64", kind="array")
        self.p = self.vector_size()

    # --- what a subclass defines -------------------------------------------------------------------
    def vector_size(self) -> int:
        """Length ``P`` of the trained vector ``v``."""
        return self.n

    def initial_vector(self) -> np.ndarray:
        """``v0``, computable by every client (zeros: the pretrained weights)."""
        return np.zeros(self.p, np.float32)

    def to_delta(self, v: torch.Tensor) -> torch.Tensor:
        """The additive change of the N masked weights that ``v`` stands for (differentiable)."""
        return v

    def compress(self, u: np.ndarray, ctx: ClientContext) -> tuple[bytes, dict[str, float]]:
        """Client: the uplink payload for the local update ``u`` (float32[P])."""
        raise NotImplementedError

    def decompress(self, payload: bytes) -> np.ndarray:
        """Server: the estimate of a client's update from its payload."""
        codec = codec_of(payload)
        allowed = {c.name for c in (self.f32, getattr(self, "codec", None)) if c is not None}
        if codec.name not in allowed:
            raise CodecError(f"{self.name} expects a {' or '.join(sorted(allowed))} payload, got {codec.name}")
        est = codec.decode(payload, expect_n=self.p)  # the header's n is checked before anything is allocated
        est = np.asarray(est, np.float32).ravel()
        if est.shape != (self.p,):
            raise CodecError(f"update has {est.size} entries, expected {self.p}")
        return est

    def server_update(self, estimates: list[np.ndarray], weights: list[float], replies: list[Reply], round_: int) -> np.ndarray:
        """The global update from the round's decoded client updates (default: their mean)."""
        return fedavg(estimates, weights)

    def validate_payload(self, payload: bytes) -> None:
        """Method-specific checks of one reply before it is decoded for aggregation (raise Rejected)."""

    def robust_update(self, ests: list[np.ndarray], weights: list[float], replies: list[Reply], round_: int, per_client: list[dict[str, Any]]) -> np.ndarray:
        """The global update under the robust options: updates norm-clipped to ``clip_factor`` times the
        round's median norm, then the method's own rule (``robust_mean=mean``) or the coordinate-wise
        median / trimmed mean. Where nothing is clipped and the rule is ``mean``, exactly
        :meth:`server_update` on the decoded updates. Records each client's norm and clip in ``per_client``."""
        zero = np.zeros(self.p, np.float32)  # a weight update is relative to nothing: the client sends the update itself
        clipped, norms, scales = clip_to_median(ests, zero, self.cfg.clip_factor)
        for rec, nrm, sc in zip(per_client, norms, scales):
            rec.update({"update_norm": nrm, **clip_fields([("update", nrm, sc)])})
        if self.cfg.robust_mean == "mean":
            return self.server_update(clipped, weights, replies, round_)
        return combine(zero, clipped, weights, self.cfg.robust_mean, self.cfg.trim_fraction, 0.0).value

    def encode_update(self, g: np.ndarray, round_: int) -> bytes:
        """Downlink encoding of the global update (default: float32, exact)."""
        return self.f32.encode(g.astype(np.float32))

    # --- helpers --------------------------------------------------------------------------------------
    def compress_seed(self, ctx: ClientContext) -> int:
        return seeding.derive_seed(ctx.seed, ctx.round, ctx.client_id, "compress")

    def is_head_round(self, round_: int) -> bool:
        return round_ <= self.cfg.head_warmup_rounds

    def decode_update(self, data: bytes) -> np.ndarray:
        return self.decompress(data)

    def set_vector(self, v: np.ndarray | None) -> None:
        """Make the network compute with ``W + to_delta(v)`` (``None``: the frozen weights)."""
        if v is None:
            self.net.use_weight_delta(None)
            return
        dev = self.net.scores.device
        with torch.no_grad():
            self.net.use_weight_delta(self.to_delta(torch.from_numpy(np.asarray(v, np.float32)).to(dev)).detach())

    # --- server ------------------------------------------------------------------------------------------
    def init_state(self) -> ServerState:
        st = super().init_state()
        st.extra[V_KEY] = self.initial_vector()
        return st

    def prepare_eval(self, state: ServerState) -> None:
        self.set_vector(state.extra[V_KEY])

    def global_delta(self, state: ServerState) -> np.ndarray:
        """The trained change of the N masked weights (for the model artifact)."""
        with torch.no_grad():
            return self.to_delta(torch.from_numpy(state.extra[V_KEY])).cpu().numpy().astype(np.float32)

    def dense_bytes(self) -> int:
        """Size of the dense float32 ``v_g`` sync part (container + 1-D shape block + 4 bytes a value)."""
        return OVERHEAD_BYTES + 9 + 4 * self.p

    def _sync_parts(self, state: ServerState, client_id: int) -> tuple[int, int, int, list[bytes]]:
        cur = state.theta_version
        have = state.client_theta_version.get(client_id, 0)
        if have == cur:
            return MODE_NONE, have, cur, []
        dense_bytes = self.dense_bytes()
        hist = [state.extra.get(f"{HIST_PREFIX}{v}") for v in range(have + 1, cur + 1)]
        if 0 <= have < cur and all(h is not None for h in hist) and sum(h.size for h in hist) < dense_bytes:  # type: ignore[union-attr]
            return MODE_UPDATES, have, cur, [h.tobytes() for h in hist]  # type: ignore[union-attr]
        return MODE_DENSE, have, cur, [self.f32.encode(state.extra[V_KEY])]

    def send(self, state: ServerState, client_id: int, round_: int) -> Sent:
        head = self.head_downlink_part(state, client_id)
        mode, a, b, sync = self._sync_parts(state, client_id)
        man = self.manifest.encode(np.array([len(head), mode, a, b, len(sync)], np.int64))
        return Sent(join_bundle([man] + head + sync), theta_version=b, head_version=state.head_version)

    def _prune_history(self, state: ServerState) -> None:
        """Keep the newest global updates while together they are smaller than the dense v_g."""
        dense_bytes = self.dense_bytes()
        total = 0
        for v in range(state.theta_version, 0, -1):
            key = f"{HIST_PREFIX}{v}"
            if key not in state.extra:
                break
            total += state.extra[key].size
            if total >= dense_bytes:
                for old in [k for k in state.extra if k.startswith(HIST_PREFIX) and int(k[len(HIST_PREFIX):]) <= v]:
                    del state.extra[old]
                break

    def aggregate(self, state: ServerState, replies: list[Reply], round_: int) -> Aggregation:
        if self.is_head_round(round_):
            return self.head_round_aggregate(state, replies, round_)
        ests, weights, good, per_client, dropped = [], [], [], [], []
        for r in replies:
            try:
                self.validate_payload(r.payload)
                est = self.decompress(r.payload)
                check_values(est, self.cfg.max_abs_param, "update")
            except Exception as e:  # noqa: BLE001 - one reply never ends the run
                dropped.append(reply_failure(r.client_id, "payload", e))
                continue
            ests.append(est)
            weights.append(r.num_samples if self.cfg.weighted else 1.0)
            good.append(r)
            per_client.append({"client": r.client_id, "bits": _bits(r.payload), "bpp": _bits(r.payload) / self.n, "codec": codec_of(r.payload).name})
        info = Aggregation("weights", len(ests), dropped, clients=per_client)
        if len(ests) < self.cfg.min_replies:
            info.skipped = True
            return info
        g = self.robust_update(ests, weights, good, round_, per_client)
        payload = self.encode_update(g, round_)
        g_hat = self.decode_update(payload)
        state.extra[V_KEY] = (state.extra[V_KEY] + g_hat).astype(np.float32)
        state.theta_version += 1
        state.extra[f"{HIST_PREFIX}{state.theta_version}"] = np.frombuffer(payload, np.uint8).copy()
        self._prune_history(state)
        self._last_update = {"global_update_bits": _bits(payload), "global_update_norm": float(np.linalg.norm(g_hat))}
        return info

    def record_fields(self, agg: Aggregation, replies: list[Reply]) -> dict[str, Any]:
        """Size and norm of the global update broadcast after this round (weight rounds only)."""
        out: dict[str, Any] = {}
        keys = [r.metrics["num_keys"] for r in replies if "num_keys" in r.metrics]
        if keys:  # sparsifiers (topk): coordinates sent per client
            out["mean_keys"] = float(np.mean(keys))
        if agg.phase == "weights" and not agg.skipped:
            out.update(self._last_update)
        return out

    # --- client ------------------------------------------------------------------------------------------
    def _client_vector(self, downlink: bytes, ctx: ClientContext) -> tuple[np.ndarray, int]:
        parts = split_bundle(downlink)
        if not parts or codec_of(parts[0]).name != "i64":
            raise ClientFailure("downlink does not start with the sync manifest")
        man = self.manifest.decode(parts[0], expect_n=5)
        if man.size != 5:
            raise ClientFailure(f"sync manifest has {man.size} fields, expected 5")
        nhead, mode, a, b, nsync = (int(x) for x in man)
        if nhead not in (0, 1) or 1 + nhead + nsync != len(parts):
            raise ClientFailure(f"downlink has {len(parts)} parts, the manifest announces {1 + nhead + nsync}")
        if nhead:
            self.client_head({"array": parts[1]}, ctx)
        v = ctx.state.get(V_KEY)
        ver = int(ctx.state.get("v_version", 0))
        if v is None:
            v, ver = self.initial_vector(), 0
        sync = parts[1 + nhead :]
        if mode == MODE_UPDATES:
            if ver != a:
                raise ClientFailure(f"server sent updates from version {a}, this client holds {ver} (cache lost?)")
            for p in sync:
                v = (v + self.decode_update(p)).astype(np.float32)
            ver = b
        elif mode == MODE_DENSE:
            d = self.f32.decode(sync[0], expect_n=self.p).astype(np.float32).ravel()
            if d.shape != (self.p,):
                raise ClientFailure(f"dense sync has {d.size} entries, expected {self.p}")
            v, ver = d, b
        elif mode != MODE_NONE:
            raise ClientFailure(f"unknown sync mode {mode}")
        ctx.state[V_KEY], ctx.state["v_version"] = v, ver
        return v, ver

    def client_update(self, downlink: bytes, data: ClientData, ctx: ClientContext) -> Reply:
        v, ver = self._client_vector(downlink, ctx)
        if self.is_head_round(ctx.round):
            self.set_vector(v)
            try:
                return self.head_round_client({}, data, ctx, ("v", ver), None)
            finally:
                self.set_vector(None)
        w, b = self.client_head({}, ctx)
        u, loss = self.train_vector(v, w, b, data, ctx)
        payload, metrics = self.compress(u, ctx)
        metrics["train_loss"] = loss
        metrics["update_norm"] = float(np.linalg.norm(u))
        return Reply(ctx.client_id, payload, data.num_samples, metrics)

    def train_vector(self, v: np.ndarray, w: np.ndarray, b: np.ndarray, data: ClientData, ctx: ClientContext) -> tuple[np.ndarray, float]:
        """Adam on ``v`` (head frozen) for ``local_epochs``; returns (``v_k - v``, mean loss)."""
        net = self.net
        dev = net.scores.device
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(w))
            net.head.bias.copy_(torch.from_numpy(b))
        net.head.requires_grad_(False)
        net.use_fixed_mask(None)
        v0 = torch.from_numpy(np.asarray(v, np.float32)).to(dev)
        vt = v0.clone().requires_grad_(True)
        opt = torch.optim.Adam([vt], lr=self.cfg.weight_lr)
        g = seeding.generator(ctx.seed, ctx.round, ctx.client_id, "shuffle")
        net.train()
        try:
            mean_loss, _ = run_epochs(
                net, data.h, data.y, opt, epochs=self.cfg.local_epochs, batch_size=self.cfg.batch_size,
                shuffle_gen=g, before_forward=lambda: net.use_weight_delta(self.to_delta(vt)),
            )
        finally:
            net.use_weight_delta(None)
            net.eval()
        u = (vt.detach() - v0).cpu().numpy().astype(np.float32)
        return u, mean_loss

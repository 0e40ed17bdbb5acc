"""The baselines DeltaMask is compared with (METHOD.md, "Baselines"), all training the maskable set.

Shared round structure, sync and byte accounting: :mod:`.weights`. bpp is always bits / N (N = the
maskable scalars), uplink and downlink, from ``len(bytes)`` of the real payloads. Wire formats of the
compressors: :mod:`deltamask.codecs.quant`. Downlink: the round's global update, float32 (32 bpp)
unless the method says otherwise below; stale clients are synced as described in :mod:`.weights`.

``fedavg``   McMahan et al., AISTATS 2017. Up: the local update, ``f32`` (32 bpp). Down: the mean, f32.
``qsgd``     Alistarh et al., NeurIPS 2017. Up: ``qsgd`` with ``qsgd_levels`` levels and buckets of
             ``qsgd_bucket`` (one f32 norm each), levels ANS-coded. Unbiased, no error feedback
             (the paper has none). Down: mean of the estimates, f32.
``signsgd``  ``signsgd_mode=ef``: EF-signSGD (Karimireddy et al., ICML 2019): ``p = u + e``, send
             ``sign1(p)`` with scale ``||p||_1/P``, keep ``e = p - decoded``. Down: mean, f32.
             ``signsgd_mode=vote``: signSGD with majority vote (Bernstein et al., ICLR 2019): send
             ``sign1(u)`` with scale ``||u||_1/P``; the server sends ``sign(sum of signs)`` (ties
             broken by a seeded coin) times the mean of the clients' scales, as ``sign1`` (1 bpp down).
``topk``     Top-k sparsification with error feedback (Aji & Heafield 2017; Stich et al., NeurIPS 2018):
             ``p = u + e``; send the ``ceil(topk_ratio * P)`` largest ``|p_i|`` (``topk``: Rice-coded
             indices, f16 values); ``e = p - decoded`` (so f16 rounding is fed back too). Down: mean, f32.
``drive``    DRIVE (Vargaftik et al., NeurIPS 2021): ``drive`` codec, 1 bit per coordinate plus one
             scale per ``rotation_block``; ``drive_scale`` unbiased or mse. Down: mean, f32.
``eden``     EDEN (Vargaftik et al., ICML 2022): ``eden`` codec with ``eden_bits`` bits per coordinate
             (sub-bit by shared-randomness sub-sampling when < 1). Down: mean, f32.
``lora``     LoRA (Hu et al., ICLR 2022) on the maskable tensors: a tensor of shape [out, in, kh, kw]
             is seen as [out, in*kh*kw] and gets ``dW = (alpha/r) B A`` with ``B`` [out, r] = 0 and ``A``
             [r, in*kh*kw] ~ N(0, 1/(in*kh*kw)) from the run seed (every client computes the same
             ``A``). Tensors where a rank-r pair is not smaller than the tensor, and depthwise kernels
             (one input channel per group, ``in == 1``), stay frozen. ``v`` = all (B, A) pairs. Up: the
             change of the adapters, ``lora_dtype`` (f32/f16). Down: the mean change, same dtype; the
             server averages A and B separately (FedAvg of adapters).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..fl import seeding
from ..codecs import CodecError, get_codec
from ..codecs.quant import DriveCodec, EdenCodec, QSGDCodec, SignCodec, TopKCodec
from ..config import ConfigError
from ..fl.robust import Rejected
from .base import ClientContext, Reply
from .weights import WeightMethod


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {msg}")


class FedAvgWeights(WeightMethod):
    name = "fedavg"
    description = "FedAvg full fine-tuning of the maskable weights, fp32 updates (32 bpp)"

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        return self.f32.encode(u), {}


class QSGD(WeightMethod):
    name = "qsgd"
    description = "QSGD (Alistarh et al. 2017): stochastic s-level quantisation, entropy-coded levels"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        try:
            self.codec = QSGDCodec(cfg.qsgd_levels, cfg.qsgd_bucket)
        except CodecError as e:
            raise ConfigError(f"config keys 'qsgd_levels'/'qsgd_bucket': {e}") from None

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        return self.codec.encode(u, seed=self.compress_seed(ctx)), {}


class _ErrorFeedback:
    """Error-feedback memory in the client's persisted state (Stich et al. 2018)."""

    KEY = "ef_error"

    @staticmethod
    def add(u: np.ndarray, ctx: ClientContext) -> np.ndarray:
        e = ctx.state.get(_ErrorFeedback.KEY)
        return u if e is None or e.shape != u.shape else (u + e).astype(np.float32)

    @staticmethod
    def keep(p: np.ndarray, sent: np.ndarray, ctx: ClientContext) -> float:
        e = (p - sent).astype(np.float32)
        ctx.state[_ErrorFeedback.KEY] = e
        return float(np.linalg.norm(e))


class SignSGD(WeightMethod):
    name = "signsgd"
    description = "signSGD: scaled sign with error feedback (EF-signSGD) or majority vote, 1 bpp"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        self.codec = SignCodec()
        self.mode = cfg.signsgd_mode
        self.client_memory = self.mode == "ef"  # error-feedback buffers live on the clients
        if self.mode == "vote" and cfg.robust_mean != "mean":
            raise ConfigError("config key 'robust_mean': signsgd_mode=vote is itself a coordinate-wise majority vote; "
                              "use robust_mean=mean (clip_factor still bounds each client's scale)")

    def validate_payload(self, payload: bytes) -> None:
        """Vote mode: a client's scale must be finite and >= 0 (a negative one would reverse the step)."""
        if self.mode == "vote":
            _, scale = self.codec.decode_signs(payload, expect_n=self.p)
            if not (np.isfinite(scale) and 0 <= scale <= self.cfg.max_abs_param):
                raise Rejected(f"signSGD scale {scale!r} is not in [0, max_abs_param={self.cfg.max_abs_param:g}]")

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        if self.mode == "vote":
            return self.codec.encode(u, scale=float(np.abs(u).mean())), {}
        p = _ErrorFeedback.add(u, ctx)
        payload = self.codec.encode(p)
        err = _ErrorFeedback.keep(p, self.codec.decode(payload, expect_n=p.size), ctx)
        return payload, {"ef_error_norm": err}

    def server_update(self, estimates, weights, replies, round_):  # type: ignore[no-untyped-def]
        if self.mode != "vote":
            return super().server_update(estimates, weights, replies, round_)
        tally = np.zeros(self.p, np.float64)
        scales = []
        for r, w, est in zip(replies, weights, estimates):
            signs, scale = self.codec.decode_signs(r.payload, expect_n=self.p)
            tally += signs
            # the scale as clipped (robust_update): |est| = scale everywhere; the payload's own where not clipped
            clipped = est.size and abs(est[0]) != np.float32(scale)
            scales.append((float(abs(est[0])) if clipped else scale, w))
        rng = seeding.rng(self.cfg.seed, round_, -1, "compress")
        coin = np.where(rng.random(self.p) < 0.5, -1.0, 1.0)
        vote = np.where(tally > 0, 1.0, np.where(tally < 0, -1.0, coin))
        scale = sum(s * w for s, w in scales) / sum(w for _, w in scales)
        self._vote_scale = scale
        return (vote * scale).astype(np.float32)

    def encode_update(self, g, round_):  # type: ignore[no-untyped-def]
        if self.mode != "vote":
            return super().encode_update(g, round_)
        return self.codec.encode(np.sign(g) + (g == 0), scale=self._vote_scale)


class TopK(WeightMethod):
    name = "topk"
    description = "Top-k sparsification with error feedback: Rice-coded indices, fp16 values"
    client_memory = True  # error-feedback buffers live on the clients

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        _need(0.0 < cfg.topk_ratio <= 1.0, "topk_ratio", "must be in (0, 1]")
        self.codec = TopKCodec(cfg.topk_ratio)

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        p = _ErrorFeedback.add(u, ctx)
        payload = self.codec.encode(p)
        err = _ErrorFeedback.keep(p, self.codec.decode(payload, expect_n=p.size), ctx)
        return payload, {"ef_error_norm": err, "num_keys": float(self.codec.k_for(p.size))}


class Drive(WeightMethod):
    name = "drive"
    description = "DRIVE (Vargaftik et al. 2021): randomized Hadamard rotation, 1 bit + one scale per block"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        try:
            self.codec = DriveCodec(unbiased=cfg.drive_scale == "unbiased", block=cfg.rotation_block)
        except CodecError as e:
            raise ConfigError(f"config key 'rotation_block': {e}") from None

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        return self.codec.encode(u, seed=self.compress_seed(ctx)), {}


class Eden(WeightMethod):
    name = "eden"
    description = "EDEN (Vargaftik et al. 2022): rotation + unbiased Lloyd-Max quantisation, sub-bit by sub-sampling"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, net)
        try:
            self.codec = EdenCodec(bits=cfg.eden_bits, block=cfg.rotation_block)
        except CodecError as e:
            raise ConfigError(f"config keys 'eden_bits'/'rotation_block': {e}") from None

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        return self.codec.encode(u, seed=self.compress_seed(ctx)), {}


class LoRA(WeightMethod):
    name = "lora"
    description = "LoRA (Hu et al. 2022) adapters on the maskable tensors, fp32 or fp16 on the wire"

    def __init__(self, cfg, net) -> None:  # type: ignore[no-untyped-def]
        _need(cfg.lora_rank >= 1, "lora_rank", "must be >= 1")
        _need(cfg.lora_alpha >= 0, "lora_alpha", "must be >= 0 (0 = the rank)")
        r = cfg.lora_rank
        #: (tensor index, out, in', offset of B in v); A follows B
        self.layout: list[tuple[int, int, int, int]] = []
        off = 0
        for i, shape in enumerate(net.shapes):
            if len(shape) not in (2, 4) or shape[1] == 1:
                continue  # depthwise kernels (and anything not a matrix/kernel) stay frozen
            out, inn = int(shape[0]), int(math.prod(shape[1:]))
            if r >= min(out, inn) or r * (out + inn) >= out * inn:
                continue
            self.layout.append((i, out, inn, off))
            off += r * (out + inn)
        if not self.layout:
            raise ConfigError(f"config key 'lora_rank': rank {r} adapts none of the maskable tensors; lower it")
        self._p = off
        self.scale = (cfg.lora_alpha or r) / r
        super().__init__(cfg, net)
        self.codec = get_codec(cfg.lora_dtype, kind="array")

    def vector_size(self) -> int:
        return self._p

    def initial_vector(self) -> np.ndarray:
        r = self.cfg.lora_rank
        v = np.zeros(self._p, np.float32)
        g = seeding.rng(self.cfg.seed, 0, -1, "lora-init")
        for _, out, inn, off in self.layout:
            a0 = off + out * r
            v[a0 : a0 + r * inn] = g.normal(0.0, 1.0 / math.sqrt(inn), r * inn)
        return v

    def to_delta(self, v: torch.Tensor) -> torch.Tensor:
        r = self.cfg.lora_rank
        pieces: list[torch.Tensor] = []
        pos = 0
        for i, out, inn, off in self.layout:
            start = self.net.offsets[i]
            if start > pos:
                pieces.append(v.new_zeros(start - pos))
            B = v[off : off + out * r].view(out, r)
            A = v[off + out * r : off + out * r + r * inn].view(r, inn)
            pieces.append((self.scale * (B @ A)).reshape(-1))
            pos = start + out * inn
        if pos < self.n:
            pieces.append(v.new_zeros(self.n - pos))
        return torch.cat(pieces)

    def compress(self, u, ctx):  # type: ignore[no-untyped-def]
        return self.codec.encode(u), {}

    def encode_update(self, g: np.ndarray, round_: int) -> bytes:
        return self.codec.encode(g)

    def describe_adapters(self) -> dict[str, int]:
        return {"adapted_tensors": len(self.layout), "frozen_tensors": len(self.net.shapes) - len(self.layout), "adapter_params": self._p}


BASELINES = (FedAvgWeights, QSGD, SignSGD, TopK, Drive, Eden, LoRA)

__all__ = ["BASELINES", "Reply"]

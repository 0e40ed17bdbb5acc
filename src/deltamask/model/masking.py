"""Stochastic binary masks over the frozen weights of any ``nn.Module``.

:class:`MaskedNetwork` holds one flat score vector ``s`` (length ``N`` = number of masked scalars)
and registers a parametrization on every masked weight, so the module computes with ``W * m``.
Before a forward pass the caller chooses the mask:

* ``sample``: ``m ~ Bernoulli(sigmoid(s))`` with a straight-through estimator: the forward value is the
  sampled ``m``; the backward pass treats ``dm/dtheta = 1`` and goes through the sigmoid to ``s``
  (FedPM, Isik et al. 2023). ``W`` never receives a gradient.
* ``fixed``: a given boolean mask (``[theta >= 0.5]`` for evaluation, or a decoded client mask).
* ``none``: the original weights.

Weight-training baselines (FedAvg, QSGD, LoRA, ...) train the *same* scalars instead of masking them:
:meth:`MaskedNetwork.use_weight_delta` sets a flat additive delta (length ``N``, may require grad), so
the module computes with ``(W + dW) * m`` (``m`` = 1 when no mask is set).

Everything before the first masked stage is mask-independent (:meth:`prefix`); the engine caches it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .backbones import LoadedModel, StagedBackbone, select_masked


def logit(p: torch.Tensor, eps: float) -> torch.Tensor:
    """logit of ``p`` clipped to ``[eps, 1-eps]`` so scores stay finite (METHOD.md)."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


class _ApplyMask(nn.Module):
    """Parametrization ``W -> (W + dW[slice]) * m[slice]`` reading the network's current delta and mask."""

    def __init__(self, owner: "MaskedNetwork", offset: int, shape: torch.Size) -> None:
        super().__init__()
        self._owner = [owner]  # list: do not register the owner as a sub-module (cycle)
        self.offset = offset
        self.shape = shape
        self.numel = int(torch.Size(shape).numel())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dw = self._owner[0]._delta
        if dw is not None:
            w = w + dw[self.offset : self.offset + self.numel].view(self.shape)
        m = self._owner[0]._current
        if m is None:
            return w
        return w * m[self.offset : self.offset + self.numel].view(self.shape)


class MaskedNetwork(nn.Module):
    """A staged backbone with masks on chosen weights, plus a linear head."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_classes: int,
        masked_blocks: int = 5,
        mask_pattern: str = "",
    ) -> None:
        super().__init__()
        self.loaded = loaded
        self.backbone: StagedBackbone = loaded.backbone
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.masked_names = select_masked(self.backbone, masked_blocks, mask_pattern)
        params = dict(self.backbone.root.named_parameters())
        stage_of = self.backbone.stage_of_parameter()
        self.first_masked_stage = min(stage_of.get(n, 0) for n in self.masked_names)
        self.shapes: list[torch.Size] = []
        self.offsets: list[int] = []
        offset = 0
        self._current: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        for name in self.masked_names:
            p = params[name]
            self.shapes.append(p.shape)
            self.offsets.append(offset)
            mod_name, _, attr = name.rpartition(".")
            module = self.backbone.root.get_submodule(mod_name) if mod_name else self.backbone.root
            parametrize.register_parametrization(module, attr, _ApplyMask(self, offset, p.shape), unsafe=True)
            offset += p.numel()
        self.num_masked = offset
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.scores = nn.Parameter(torch.zeros(self.num_masked))

    # --- mask control ------------------------------------------------------------------------------
    @property
    def num_backbone_params(self) -> int:
        return self.loaded.num_backbone_params

    def set_scores_from_probs(self, theta: torch.Tensor, eps: float) -> None:
        with torch.no_grad():
            self.scores.copy_(logit(theta.to(self.scores), eps))

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.scores)

    def use_sampled_mask(self, generator: torch.Generator) -> None:
        """Sample ``m ~ Bernoulli(sigmoid(s))``; straight-through gradient to the scores."""
        theta = torch.sigmoid(self.scores)
        u = torch.rand(theta.shape, generator=generator, device=theta.device)
        m = (u < theta).to(theta.dtype)
        self._current = theta + (m - theta).detach()

    def use_fixed_mask(self, mask: torch.Tensor | None) -> None:
        self._current = None if mask is None else mask.to(self.scores.device, self.scores.dtype)

    def use_weight_delta(self, delta: torch.Tensor | None) -> None:
        """Add a flat delta (length N) to the masked weights; ``None`` restores the frozen weights."""
        if delta is not None and delta.shape != (self.num_masked,):
            raise ValueError(f"weight delta has shape {tuple(delta.shape)}, expected ({self.num_masked},)")
        self._delta = delta

    # --- forward pieces ----------------------------------------------------------------------------
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Mask-independent stages (computed once per image and cached by the engine)."""
        return self.backbone(x, 0, self.first_masked_stage)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Masked stages and the rest of the backbone, from a prefix output to pooled features."""
        return self.backbone(h, self.first_masked_stage, None)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_prefix(self.prefix(x))

    def train(self, mode: bool = True) -> "MaskedNetwork":
        # The backbone always runs in eval mode: frozen BN statistics, no dropout.
        super().train(mode)
        self.backbone.eval()
        return self


def sample_mask(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli(theta) mask as bool, drawn with the given generator."""
    u = torch.rand(theta.shape, generator=generator, device=theta.device)
    return u < theta

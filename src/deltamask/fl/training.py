"""Client-side computation: pure torch, no I/O, no codecs.

``train_scores``   METHOD.md step 2: scores ``s = logit(theta_g)`` trained for E epochs with Adam, a
                   fresh straight-through Bernoulli mask per forward pass, the head frozen.
``train_head``     local linear probing: the head trained on fixed features (FedAvg's local step).
``evaluate``       accuracy and loss of the network under a fixed mask.
``label_log_prior`` a client's log label frequencies, for the balanced loss (logit adjustment).

Inputs are *prefix outputs* (the cached, mask-independent part of the backbone) so a local epoch
costs only the masked part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.masking import MaskedNetwork
from ..model.prefix_cache import PrefixRows


@dataclass
class TrainResult:
    theta: torch.Tensor  # the client's keep-probabilities sigmoid(s) after training
    loss: float
    steps: int


def label_log_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of the client's label frequencies, Laplace-smoothed: ``log((n_c + 1) / (n + C))``, float32 [C].

    Added to the logits in the local loss (balanced softmax; logit adjustment as in FedLC, Zhang et al.
    2022), it lets the client's own label skew explain its labels, so local training fits the classes apart
    instead of pulling the model (mask or head) towards the classes this client happens to hold. Evaluation
    uses the plain logits."""
    counts = torch.bincount(y.to(torch.int64).cpu(), minlength=num_classes)[:num_classes].to(torch.float64)
    return torch.log((counts + 1.0) / (counts.sum() + num_classes)).to(torch.float32)


def _loss(logits: torch.Tensor, yb: torch.Tensor, log_prior: torch.Tensor | None) -> torch.Tensor:
    if log_prior is None:
        return F.cross_entropy(logits, yb)
    return F.cross_entropy(logits + log_prior.to(logits.device), yb)


def _batches(n: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def run_epochs(
    net: MaskedNetwork,
    h: PrefixRows,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    shuffle_gen: torch.Generator,
    before_forward: Callable[[], None],
    log_prior: torch.Tensor | None = None,
) -> tuple[float, int]:
    """The local loop every trained method shares: shuffled mini-batches of prefix outputs, cross-entropy
    of the network's logits, one optimizer step each. ``before_forward`` sets what varies per step (a
    fresh sampled mask, the current weight change); ``log_prior`` (:func:`label_log_prior`) makes it the
    balanced loss. Returns (mean loss, steps)."""
    total, steps = 0.0, 0
    dev = net.scores.device
    for _ in range(epochs):
        for idx in _batches(h.shape[0], batch_size, shuffle_gen):
            xb, yb = h[idx].to(dev, torch.float32), y[idx].to(dev)  # stored rows may be fp16 / bf16 / on disk
            before_forward()
            loss = _loss(net.forward_from_prefix(xb), yb, log_prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), steps


def train_scores(
    net: MaskedNetwork,
    theta_g: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    eps: float,
    shuffle_gen: torch.Generator,
    mask_gen: torch.Generator,
    train_head: bool = False,
    head_lr: float = 0.01,
    log_prior: torch.Tensor | None = None,
) -> TrainResult:
    """Train the mask scores (and optionally the head) on prefix outputs ``h`` with labels ``y``."""
    net.set_scores_from_probs(theta_g, eps)
    net.scores.requires_grad_(True)
    params = [{"params": [net.scores], "lr": lr}]
    net.head.requires_grad_(train_head)
    if train_head:
        params.append({"params": list(net.head.parameters()), "lr": head_lr})
    opt = torch.optim.Adam(params)
    net.train()
    mean_loss, steps = run_epochs(
        net, h, y, opt, epochs=epochs, batch_size=batch_size, shuffle_gen=shuffle_gen,
        before_forward=lambda: net.use_sampled_mask(mask_gen), log_prior=log_prior,
    )
    net.use_fixed_mask(None)
    net.scores.requires_grad_(False)
    net.head.requires_grad_(False)
    net.eval()
    with torch.no_grad():
        theta = torch.sigmoid(net.scores).clamp(eps, 1 - eps).clone()
    return TrainResult(theta, mean_loss, steps)


def train_head(
    weight: torch.Tensor,
    bias: torch.Tensor,
    feats: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    shuffle_gen: torch.Generator,
    log_prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adam on a linear head over fixed features (the balanced loss with ``log_prior``); returns (weight,
    bias, mean loss)."""
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in _batches(feats.shape[0], batch_size, shuffle_gen):
            fb, yb = feats[idx].to(w.device), y[idx].to(w.device)
            loss = _loss(F.linear(fb, w, b), yb, log_prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return w.detach(), b.detach(), total / max(steps, 1)


@torch.no_grad()
def compute_features(net: MaskedNetwork, h: PrefixRows, mask: torch.Tensor | None, batch_size: int = 256) -> torch.Tensor:
    """Pooled backbone features of prefix outputs ``h`` under a fixed mask (``None`` = unmasked)."""
    net.eval()
    net.use_fixed_mask(mask)
    dev = net.scores.device
    out = [net.features(h[i : i + batch_size].to(dev, torch.float32)) for i in range(0, h.shape[0], batch_size)]
    net.use_fixed_mask(None)
    return torch.cat(out) if out else torch.zeros(0, net.backbone.feature_dim, device=dev)


@torch.no_grad()
def evaluate(net: MaskedNetwork, h: PrefixRows, y: torch.Tensor, mask: torch.Tensor | None, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the network with a fixed mask on prefix outputs."""
    feats = compute_features(net, h, mask, batch_size)
    logits = net.head(feats)
    yy = y.to(logits.device)
    loss = F.cross_entropy(logits, yy).item() if len(yy) else math.nan
    acc = (logits.argmax(1) == yy).float().mean().item() if len(yy) else math.nan
    return acc, loss

"""Server-side state and Bayesian aggregation of client masks (pure numpy).

METHOD.md step 8: ``alpha += w * m_hat``, ``beta += w * (1 - m_hat)`` over the round's clients, one
client at a time (streaming: memory stays O(N) whatever K is); ``theta_g`` is the posterior mean
``alpha / (alpha + beta)`` (or the mode), clipped to ``[eps, 1-eps]``. Priors reset to Beta(1, 1)
every ``reset_every`` rounds (1: FedPM's default, the posterior is the plain mean of the masks;
0: never).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ServerState:
    """Everything the server needs to continue a run (persisted after every round)."""

    round: int  # last completed round (0 before the first)
    theta: np.ndarray  # float32[N], the broadcast keep-probabilities (as the clients decode them)
    alpha: np.ndarray  # float32[N]
    beta: np.ndarray  # float32[N]
    head_weight: np.ndarray  # float32[C, D]
    head_bias: np.ndarray  # float32[C]
    head_version: int = 0
    #: which head version each client holds (clients cache the head; it goes down only when stale)
    client_head_version: dict[int, int] = field(default_factory=dict)
    theta_version: int = 0
    client_theta_version: dict[int, int] = field(default_factory=dict)
    #: for the exact counts downlink: integer keep-counts and how many masks they sum
    counts: np.ndarray | None = None
    counts_total: int = 0
    #: method-specific arrays (baselines' server-side buffers)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def init_state(n: int, theta0: float, head_weight: np.ndarray, head_bias: np.ndarray) -> ServerState:
    return ServerState(
        round=0,
        theta=np.full(n, theta0, dtype=np.float32),
        alpha=np.ones(n, dtype=np.float32),
        beta=np.ones(n, dtype=np.float32),
        head_weight=head_weight.astype(np.float32),
        head_bias=head_bias.astype(np.float32),
    )


class MaskAggregator:
    """Streaming Beta-posterior aggregation of one round's decoded masks."""

    def __init__(self, state: ServerState, round_: int, reset_every: int, weighted: bool) -> None:
        self.weighted = weighted
        if reset_every > 0 and (round_ - 1) % reset_every == 0:
            self.alpha = np.ones_like(state.alpha)
            self.beta = np.ones_like(state.beta)
            self.reset = True
        else:
            self.alpha = state.alpha.copy()
            self.beta = state.beta.copy()
            self.reset = False
        self.counts = np.zeros(state.alpha.shape, dtype=np.int32)
        self.total = 0
        self.items: list[tuple[np.ndarray, float]] = []

    def add(self, mask: np.ndarray, weight: float = 1.0) -> None:
        """Add one client's mask. Weighted aggregation is applied in :meth:`finish`, once the
        round's total sample count is known (weights are normalised to sum to K)."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != self.alpha.shape:
            raise ValueError(f"mask has shape {m.shape}, expected {self.alpha.shape}")
        if self.weighted:
            self.items.append((np.packbits(m), float(weight)))
        else:
            self.alpha += m
            self.beta += ~m
        self.counts += m
        self.total += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.weighted and self.items:
            wsum = sum(w for _, w in self.items)
            n = self.alpha.size
            for packed, w in self.items:
                m = np.unpackbits(packed, count=n).astype(bool)
                ww = np.float32(len(self.items) * w / wsum)
                self.alpha += ww * m
                self.beta += ww * ~m
        return self.alpha, self.beta

    @property
    def counts_exact(self) -> bool:
        """Whether theta is a function of integer counts (so the counts downlink is exact)."""
        return self.reset and not self.weighted


def posterior(alpha: np.ndarray, beta: np.ndarray, stat: str, eps: float) -> np.ndarray:
    """Posterior mean or mode of Beta(alpha, beta), clipped to [eps, 1 - eps], float32."""
    a = alpha.astype(np.float64)
    b = beta.astype(np.float64)
    if stat == "mean":
        th = a / (a + b)
    elif stat == "mode":
        denom = a + b - 2.0
        safe = np.where(denom > 0, denom, 1.0)
        th = np.where(denom > 0, (a - 1.0) / safe, 0.5)
    else:
        raise ValueError(f"unknown posterior statistic {stat!r}; valid: mean, mode")
    return np.clip(th, eps, 1.0 - eps).astype(np.float32)


def fedavg(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted average of same-shaped arrays (float64 accumulation, float32 result)."""
    total = float(sum(weights))
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += (w / total) * a.astype(np.float64)
    return acc.astype(np.float32)

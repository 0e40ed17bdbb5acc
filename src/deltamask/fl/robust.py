"""What the server believes of a client's reply: the checks and the robust rules (pure numpy).

A reply is another party's input. Before it touches server state the round driver and the methods check
it against what the server itself knows (issue 21):

* :func:`screen_reply` -- the reply's envelope: ``num_samples`` must be the size of the client's partition
  as the server computed it (the server's number is used, never the client's), and every metric must be a
  finite number (metrics are for reporting only; the server computes what it acts on);
* :func:`check_values` -- every float of a decoded head or weight update is finite and within
  ``max_abs_param``;
* :func:`flip_outliers` -- a mask reply flipping more than ``max_flip_fraction`` of the N weights, or more
  than ``flip_outlier`` times the round's median, is rejected: one client's mask is one vote per weight, but
  a client that flips many at once pulls theta towards 0.5 everywhere and inflates every honest client's
  next delta (REFERENCE.md, robust aggregation);
* :func:`combine` -- heads and weight updates: norm clipping to ``clip_factor`` times the round's median
  update norm, then the mean (FedAvg), the coordinate-wise median or the trimmed mean, the rules users know
  from Flower (``FedMedian``, ``FedTrimmedAvg``, fixed / adaptive clipping) and NVFlare;
* :func:`trust_combine` -- heads, where the server holds a root set (``root_samples``): FLTrust's trust
  scores against the server's own update on clean data, the defense against clients that train honestly on
  poisoned labels (whose updates have honest norms, so clipping and coordinate-wise rules miss them);
* :func:`cohort_cosines` -- heads, reported in every round with heads (no server data needed): each client's
  agreement with the coordinate-wise median of the round's updates, so that an operator can see from
  ``metrics.jsonl`` a client whose head points away from the cohort's, as a label flipper's does.

Where nothing is clipped or rejected the result is bit for bit the plain FedAvg of before: the clipping
only rescales the updates it clips, and the mean is the same :func:`fedavg` call on the same arrays.
A failed check raises :class:`Rejected`; the method records it as that reply's ``rejected`` failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .aggregation import CHUNK, fedavg

#: the most a reply's metrics may hold (they are written to metrics.jsonl): more is not a client's report
MAX_METRICS = 64


class Rejected(ValueError):
    """A reply failed a check against what the server knows; the message says which and by how much."""


def screen_reply(client_id: int, claimed_samples: Any, metrics: Mapping[str, Any], expected_samples: int) -> None:
    """The reply's envelope against the server's own knowledge; raises :class:`Rejected`."""
    try:
        claimed = int(claimed_samples)
        exact = claimed == claimed_samples
    except (TypeError, ValueError, OverflowError):
        claimed, exact = -1, False
    if not exact or claimed != expected_samples:
        raise Rejected(f"num_samples {claimed_samples!r} claimed, the server's partition of client {client_id} holds {expected_samples}")
    if len(metrics) > MAX_METRICS:
        raise Rejected(f"{len(metrics)} metrics sent, at most {MAX_METRICS}")
    for k, v in metrics.items():
        if not isinstance(k, str) or len(k) > 64:
            raise Rejected(f"metric name {str(k)[:40]!r} is not a short string")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
            raise Rejected(f"metric {k!r} is {str(v)[:40]!r}, not a finite number")


def check_count(name: str, value: Any, hi: int) -> int:
    """A client-reported count (reporting only) that must be an integer in ``[0, hi]``."""
    v = float(value)
    if not (math.isfinite(v) and v == int(v) and 0 <= v <= hi):
        raise Rejected(f"metric {name!r} is {value!r}, not an integer in [0, {hi}]")
    return int(v)


def check_values(a: np.ndarray, bound: float, what: str) -> None:
    """Every entry of ``a`` finite with ``|x| <= bound``; raises :class:`Rejected` naming the first bad one."""
    a = np.asarray(a)
    flat = a.reshape(-1)
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise Rejected(f"{what} holds {int(bad.sum())} non-finite values (entry {i} is {flat[i]})")
    if flat.size:
        big = np.abs(flat.astype(np.float64)) > bound
        if big.any():
            i = int(np.flatnonzero(big)[0])
            raise Rejected(f"{what} entry {i} is {float(flat[i]):g}, beyond max_abs_param={bound:g}")


def flip_outliers(flips: Mapping[int, int], n: int, cap: int | Mapping[int, int | None] | None, factor: float,
                  cap_name: str = "max_flip_fraction") -> dict[int, str]:
    """Clients to reject for the number of mask entries they flip against the reference: over ``cap`` (one
    for all, or per client; ``None``: no cap), or over ``factor`` times the median of the round's replies
    (3 or more; ``factor`` 0: off). Returns {client: reason}."""
    out: dict[int, str] = {}
    for c, k in flips.items():
        lim = cap.get(c) if isinstance(cap, Mapping) else cap
        if lim is not None and k > lim:
            out[c] = f"flips {k} of {n} mask entries, over the cap {lim} ({cap_name})"
    if factor and len(flips) >= 3 and float(np.median(list(flips.values()))) > 0:  # a median of 0 bounds nothing
        med = float(np.median(list(flips.values())))
        lim = factor * med
        for c, k in flips.items():
            if c not in out and k > lim:
                out[c] = f"flips {k} mask entries, {k / max(med, 1):.1f}x the round's median {med:g} (flip_outlier={factor:g})"
    return out


@dataclass
class Combined:
    """The combined vector and, per client (in input order), its update norm and clip scale."""

    value: np.ndarray
    norms: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)  # 1.0 where not clipped
    median_norm: float = 0.0


def clip_scales(norms: list[float], factor: float) -> tuple[list[float], float]:
    """Scale factors that bring each norm to at most ``factor`` times the median norm (1.0: untouched)."""
    med = float(np.median(norms)) if norms else 0.0
    if not factor or len(norms) < 2:
        return [1.0] * len(norms), med
    lim = factor * med
    return [lim / x if x > lim else 1.0 for x in norms], med


def clip_to_median(items: list[np.ndarray], base: np.ndarray, factor: float) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Each client's update ``item - base`` norm-clipped to ``factor`` times the round's median update norm:
    (the items as clipped, ``base + s * (item - base)``, and the very same arrays where untouched; their
    update norms; the scales, 1.0 where untouched)."""
    base64 = base.astype(np.float64)
    norms = [float(np.linalg.norm(it.astype(np.float64) - base64)) for it in items]
    scales, _ = clip_scales(norms, factor)
    clipped = [it if s == 1.0 else (base64 + s * (it.astype(np.float64) - base64)).astype(np.float32) for it, s in zip(items, scales)]
    return clipped, norms, scales


def clip_fields(parts: list[tuple[str, float, float]]) -> dict[str, Any]:
    """A client's record of what was clipped, from ``(what, update norm, scale)`` per clipped tensor: the
    smallest scale and the reason; {} where nothing was."""
    why = [f"{name} norm {n:.4g} clipped to {n * s:.4g} (clip_factor x the round's median)" for name, n, s in parts if s != 1.0]
    if not why:
        return {}
    return {"clipped": min(s for _, _, s in parts if s != 1.0), "clip_reason": "; ".join(why)}


def combine(
    base: np.ndarray, items: list[np.ndarray], weights: list[float], rule: str = "mean", trim: float = 0.2, clip: float = 0.0
) -> Combined:
    """Combine the clients' vectors ``items`` (each the client's new value; its update is ``item - base``).

    1. ``clip`` > 0: an update whose L2 norm exceeds ``clip`` times the round's median update norm is scaled
       down to it (the item becomes ``base + s * (item - base)``); the others stay the very same arrays.
    2. ``rule``: ``mean`` = :func:`fedavg` with ``weights``; ``median`` = coordinate-wise median;
       ``trimmed-mean`` = per coordinate, the mean after cutting ``max(1, floor(trim * K))`` values at each
       end (the median where that leaves nothing). Median and trimmed mean ignore the weights.
    """
    if not items:
        raise ValueError("nothing to combine")
    clipped, norms, scales = clip_to_median(items, base, clip)
    med = float(np.median(norms))
    if rule == "mean":
        value = fedavg(clipped, weights)
    elif rule in ("median", "trimmed-mean"):
        k = len(clipped)
        t = max(1, int(math.floor(trim * k))) if rule == "trimmed-mean" else 0
        flat = [c.reshape(-1) for c in clipped]
        value = np.empty(flat[0].size, np.float32)
        for lo in range(0, value.size, CHUNK):  # K x CHUNK float64 at a time, not K x P
            stack = np.stack([f[lo : lo + CHUNK].astype(np.float64) for f in flat])
            if rule == "median" or k - 2 * t < 1:
                value[lo : lo + CHUNK] = np.median(stack, axis=0)
            else:
                value[lo : lo + CHUNK] = np.sort(stack, axis=0)[t : k - t].mean(axis=0)
        value = value.reshape(clipped[0].shape)
    else:
        raise ValueError(f"unknown robust rule {rule!r}; valid: mean, median, trimmed-mean")
    return Combined(value, norms, scales, med)


@dataclass
class Trusted:
    """:func:`trust_combine`'s result: the combined vector (None where no client earned any trust) and, per
    client in input order, the cosine of its update to the server's, its trust score and update norm."""

    value: np.ndarray | None
    cosines: list[float]
    trust: list[float]
    norms: list[float]
    root_norm: float


def trust_combine(base: np.ndarray, items: list[np.ndarray], root: np.ndarray, weights: list[float] | None = None) -> Trusted:
    """FLTrust (Cao et al., NDSS 2021) over the clients' vectors ``items`` (each the client's new value, its
    update ``item - base``), against ``root``, the server's own new value from its root set.

    Client i's trust is ``max(0, cos(g_i, g_0))`` with ``g_0 = root - base``; its update is rescaled to
    ``|g_0|``; the result is ``base + sum_i w_i t_i g_i |g_0| / |g_i| / sum_i w_i t_i`` (``weights`` w_i: 1
    each by default). A zero update earns no trust. Where no client earns any (all point away from the
    server's update, or the server's update is zero) the value is None: the caller keeps ``base``."""
    b = base.astype(np.float64).reshape(-1)
    g0 = root.astype(np.float64).reshape(-1) - b
    n0 = float(np.linalg.norm(g0))
    w = [1.0] * len(items) if weights is None else [float(x) for x in weights]
    acc = np.zeros_like(b)
    total = 0.0
    cosines, trust, norms = [], [], []
    for it, wi in zip(items, w):
        g = it.astype(np.float64).reshape(-1) - b
        n = float(np.linalg.norm(g))
        cos = float(g @ g0 / (n * n0)) if n > 0 and n0 > 0 else 0.0
        t = max(0.0, cos)
        cosines.append(cos)
        trust.append(t)
        norms.append(n)
        if t > 0 and wi > 0:
            acc += (wi * t * n0 / n) * g
            total += wi * t
    value = (b + acc / total).astype(np.float32).reshape(base.shape) if total > 0 else None
    return Trusted(value, cosines, trust, norms, n0)


def cohort_cosines(updates: list[np.ndarray]) -> list[float] | None:
    """Each update's cosine to the coordinate-wise median of all of them (the cohort's direction, which
    fewer than half of the clients cannot move far). A zero vector (the update or the median) has cosine 0.
    None with fewer than 3 updates, where a median says nothing about who is the odd one out."""
    if len(updates) < 3:
        return None
    flat = [u.reshape(-1) for u in updates]
    ref = np.empty(flat[0].size, np.float64)
    for lo in range(0, ref.size, CHUNK):  # K x CHUNK float64 at a time, not K x P
        ref[lo : lo + CHUNK] = np.median(np.stack([f[lo : lo + CHUNK].astype(np.float64) for f in flat]), axis=0)
    nr = float(np.linalg.norm(ref))
    out = []
    for f in flat:
        g = f.astype(np.float64)
        n = float(np.linalg.norm(g))
        out.append(float(g @ ref / (n * nr)) if n > 0 and nr > 0 else 0.0)
    return out


def nonfinite_fields(arrays: Mapping[str, Any]) -> list[str]:
    """Names of the arrays that hold a NaN or an infinity (server state, a model about to be written)."""
    bad = []
    for name, a in arrays.items():
        if a is None:
            continue
        arr = np.asarray(a)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad.append(name)
    return bad

"""Server-side state and Bayesian aggregation of client masks.

METHOD.md step 8: ``alpha += w * m_hat``, ``beta += w * (1 - m_hat)`` over the round's clients, one
client at a time; ``theta_g`` is the posterior mean ``alpha / (alpha + beta)`` (or the mode), clipped
to ``[eps, 1-eps]``. Priors reset to Beta(1, 1) every ``reset_every`` rounds (1: FedPM's default, the
posterior is the plain mean of the masks; 0: never).

Cost at foundation-model scale (issue 13). Every client's mask is held as its difference from the
round's reference ``r = [theta_g >= 0.5]``: a DeltaMask client's mask differs from ``r`` only at the
``k`` indices it sent, so adding it is ``flips[idx] += 1``, O(k), and the number of ones among the
K masks is ``K - flips`` where ``r`` is set and ``flips`` elsewhere, computed once per round (O(N)).
Payloads that only exist densely (filters, whose decode is a query of all N indices, and FedPM's
masks) are added with one O(N) pass over a narrow integer array. ``flips`` and the counts use the
narrowest unsigned dtype that holds ``0..K`` (one byte per weight up to K = 255).

Exactness: the result is bit-for-bit the one of the obvious dense loop (``tests/fl/test_aggregation.py``
keeps that loop as the reference). With unweighted masks and integer-valued priors every sum is an
integer below 2^24, exact in float32 in any order, so ``alpha = prior + counts``. Weighted sums are
float32 sums whose rounding depends on the order of the clients, so they are replayed client by
client in the original order: with a reset, only over the indices some client flipped (every other
index saw the same sequence of additions, a scalar); without one, over all N (one float32 pass per
client, not a decode).

The same aggregation runs on torch tensors (CUDA, or CPU for the tests) when ``device`` is a torch
device: identical results, as every step is an integer count or the same IEEE float32 addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..codecs.base import Levels
from ..codecs.delta import LEVEL_KINDS

#: Elements per block of the chunked O(N) passes: a few MB of temporaries instead of O(N) ones.
CHUNK = 1 << 20
#: float32 holds every integer up to 2^24 exactly; unweighted sums stay below this bound.
F32_EXACT_INT = 1 << 24


@dataclass
class ThetaVersion:
    """What the server keeps of one broadcast theta version (:mod:`deltamask.methods.downlink`): while some
    client may hold it, its digest and the integer levels its snapshot codec sent (to code a later version
    against); while a client behind it may replay through it, the round that made it and that round's
    accepted uplink payloads (concatenated bundle parts, ``replay_parts`` of them)."""

    digest: bytes | None = None
    levels: Levels | None = None
    replay_round: int | None = None
    replay: bytes | None = None
    replay_parts: int = 0

    @property
    def empty(self) -> bool:
        return self.digest is None and self.levels is None and self.replay is None


#: persisted names of a ThetaVersion's arrays: ``extra/dl/<what>/<version>`` (the layout of state files
#: written before the history was typed, so that they resume and new ones read the same)
_DL = "dl/"


def theta_versions_to_arrays(versions: dict[int, ThetaVersion]) -> dict[str, np.ndarray]:
    """The history as named arrays (keys relative to ``extra/``) for the state file."""
    out: dict[str, np.ndarray] = {}
    for v, tv in sorted(versions.items()):
        if tv.digest is not None:
            out[f"{_DL}digest/{v}"] = np.frombuffer(tv.digest, dtype=np.uint8).copy()
        if tv.levels is not None:
            kind, total, levels = tv.levels
            out[f"{_DL}levels/{v}"] = np.ascontiguousarray(levels)
            out[f"{_DL}meta/{v}"] = np.array([LEVEL_KINDS[kind], total], dtype=np.int64)
        if tv.replay is not None:
            out[f"{_DL}replay/{v}"] = np.frombuffer(tv.replay, dtype=np.uint8).copy()
            out[f"{_DL}replay_meta/{v}"] = np.array([tv.replay_round, tv.replay_parts], dtype=np.int64)
    return out


def theta_versions_from_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[int, ThetaVersion], dict[str, np.ndarray]]:
    """(the history, the arrays that are not part of it) from a state file's ``extra/`` arrays; a level
    array without its kind, or a replay without its round, is dropped (that version is then sent a
    snapshot)."""
    kind_of = {i: k for k, i in LEVEL_KINDS.items()}
    rest: dict[str, np.ndarray] = {}
    parts: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        bits = key.split("/")
        if len(bits) == 3 and bits[0] == _DL[:-1] and bits[2].lstrip("-").isdigit():
            parts.setdefault(int(bits[2]), {})[bits[1]] = arr
        else:
            rest[key] = arr
    versions: dict[int, ThetaVersion] = {}
    for v, p in parts.items():
        tv = ThetaVersion()
        if "digest" in p:
            tv.digest = bytes(np.asarray(p["digest"], dtype=np.uint8))
        if "levels" in p and "meta" in p and int(p["meta"][0]) in kind_of:
            tv.levels = (kind_of[int(p["meta"][0])], int(p["meta"][1]), p["levels"])
        if "replay" in p and "replay_meta" in p:
            tv.replay = bytes(np.asarray(p["replay"], dtype=np.uint8))
            tv.replay_round, tv.replay_parts = int(p["replay_meta"][0]), int(p["replay_meta"][1])
        if not tv.empty:
            versions[v] = tv
    return versions, rest


@dataclass
class ServerState:
    """Everything the server needs to continue a run (persisted after every round)."""

    round: int  # last completed round (0 before the first)
    theta: np.ndarray  # float32[N], the broadcast keep-probabilities (as the clients decode them)
    #: float32[N] Beta posterior parameters, kept only where the next round reads them (priors not
    #: reset every round); None otherwise (the default reset_every=1 needs only the counts)
    alpha: np.ndarray | None
    beta: np.ndarray | None
    head_weight: np.ndarray  # float32[C, D]
    head_bias: np.ndarray  # float32[C]
    head_version: int = 0
    #: which head version each client holds (clients cache the head; it goes down only when stale)
    client_head_version: dict[int, int] = field(default_factory=dict)
    theta_version: int = 0
    client_theta_version: dict[int, int] = field(default_factory=dict)
    #: for the exact counts downlink: integer keep-counts (narrowest unsigned dtype) and how many
    #: masks they sum
    counts: np.ndarray | None = None
    counts_total: int = 0
    #: method-specific arrays (baselines' server-side buffers)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    #: the theta downlink's history: per version some client may hold or replay through (methods/downlink.py)
    theta_versions: dict[int, ThetaVersion] = field(default_factory=dict)
    #: client id -> the identity bound to it for the whole run (Transport.identities; Flower nodes)
    identities: dict[int, str] = field(default_factory=dict)


def init_state(n: int, theta0: float, head_weight: np.ndarray, head_bias: np.ndarray,
               posterior_params: bool = True) -> ServerState:
    """Round-0 state; ``posterior_params=False`` leaves alpha/beta out (methods that never read them)."""
    return ServerState(
        round=0,
        theta=np.full(n, theta0, dtype=np.float32),
        alpha=np.ones(n, dtype=np.float32) if posterior_params else None,
        beta=np.ones(n, dtype=np.float32) if posterior_params else None,
        head_weight=head_weight.astype(np.float32),
        head_bias=head_bias.astype(np.float32),
    )


def count_dtype(total: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds every count in ``0..total``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if 0 <= total <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"cannot count {total} masks (at most 2^32 - 1)")


def _torch_dtype(total: int) -> Any:
    import torch

    return torch.uint8 if total <= 255 else torch.int32  # torch's uint16/uint32 lack indexing arithmetic


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _integral_below(a: np.ndarray, bound: float) -> bool:
    """Whether every value of ``a`` is an integer in [0, bound) (chunked: no O(N) temporaries)."""
    for lo in range(0, a.size, CHUNK):
        c = a[lo : lo + CHUNK]
        if c.size and (not np.array_equal(c, np.floor(c)) or c.min() < 0 or c.max() >= bound):
            return False
    return True


def sequential_sum_f32(start: float, weights: list[np.float32]) -> np.float32:
    """``(((start + w_1) + w_2) + ...)`` with float32 rounding after every addition."""
    s = np.float32(start)
    for w in weights:
        s = np.float32(s + w)
    return s


class MaskAggregator:
    """Streaming Beta-posterior aggregation of one round's client masks (see the module docstring).

    Add each client with the cheapest form its payload decodes to: :meth:`add_flips` (the sorted
    indices where its mask differs from the reference, O(k)), :meth:`add_flip_mask` (the same as a
    dense boolean array: filters' query-all, O(N)) or :meth:`add` (the mask itself, O(N)). Then
    :meth:`counts` (ones per weight; exact-counts mode), :meth:`finish` (alpha, beta) or
    :meth:`theta`.

    ``device``: None or ``"numpy"`` for numpy arrays; a torch device (``"cuda"``, ``"cpu"``) to keep
    the per-round arrays as torch tensors there. Results are numpy arrays either way.
    """

    def __init__(self, state: ServerState, round_: int, reset_every: int, weighted: bool,
                 reference: np.ndarray | None = None, device: Any = None) -> None:
        self.weighted = weighted
        self.n = int(state.theta.size)
        self.reset = reset_every > 0 and (round_ - 1) % reset_every == 0
        if not self.reset and (state.alpha is None or state.beta is None):
            raise ValueError("this round continues the Beta posterior but the state holds no alpha/beta "
                             "(it was written with reset_every=1); resume with the same reset_every")
        if not self.reset and (state.alpha.shape != (self.n,) or state.beta.shape != (self.n,)):
            raise ValueError(f"alpha/beta have shapes {state.alpha.shape}/{state.beta.shape}, theta has {self.n} entries")
        ref = state.theta >= 0.5 if reference is None else np.asarray(reference)
        if ref.dtype != np.bool_ or ref.shape != (self.n,):
            raise ValueError(f"reference must be a bool array of shape ({self.n},), got {ref.dtype} {ref.shape}")
        self._state = state
        #: unweighted sums of integer-valued priors are exact in float32 whatever the order
        self._integer_sums = not weighted and (
            self.reset or (_integral_below(state.alpha, F32_EXACT_INT // 2) and _integral_below(state.beta, F32_EXACT_INT // 2)))
        #: otherwise every client's contribution is replayed in order at finish
        self._keep_items = not self._integer_sums
        self.torch_device = None
        if device is not None and not (isinstance(device, str) and device == "numpy"):
            import torch

            self.torch_device = torch.device(device)
        if self.torch_device is None:
            self.reference = ref
            self.flips = np.zeros(self.n, dtype=np.uint8)
        else:
            import torch

            self.reference = torch.from_numpy(np.ascontiguousarray(ref)).to(self.torch_device)
            self.flips = torch.zeros(self.n, dtype=torch.uint8, device=self.torch_device)
        self.total = 0
        #: (flipped indices, or a dense flip mask, weight) per client, when sums must be replayed
        self.items: list[tuple[Any, float]] = []

    # --- adding clients ---------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Widen the flip counter before it could overflow (uint8 holds 255 clients)."""
        if self.torch_device is None:
            if self.total + 1 > np.iinfo(self.flips.dtype).max:
                self.flips = self.flips.astype(count_dtype(2 * (self.total + 1)))
        elif self.total + 1 > 255 and self.flips.dtype != _torch_dtype(self.total + 1):
            self.flips = self.flips.to(_torch_dtype(self.total + 1))

    def add_flips(self, indices: Any, weight: float = 1.0) -> None:
        """Add the mask ``reference XOR [i in indices]``: sorted distinct indices in [0, N), O(k)."""
        idx = indices
        if _is_torch(idx):
            idx = idx.cpu().numpy()
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"flipped indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size:
            if idx[0] < 0 or idx[-1] >= self.n:
                raise ValueError(f"flipped indices must lie in [0, {self.n}); got [{idx[0]}, {idx[-1]}]")
            if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                raise ValueError("flipped indices must be sorted and distinct")
        self._grow()
        small = idx.astype(np.uint32 if self.n <= 1 << 32 else np.int64, copy=False)
        if self.torch_device is None:
            self.flips[small] += 1
        else:
            import torch

            t = torch.from_numpy(idx.astype(np.int64, copy=False)).to(self.torch_device)
            self.flips[t] += 1
        if self._keep_items:
            self.items.append((small.copy() if small is idx else small, float(weight)))
        self.total += 1

    def add_flip_mask(self, flipped: Any, weight: float = 1.0) -> None:
        """Add the mask ``reference XOR flipped`` for a dense boolean ``flipped`` (numpy or torch), O(N)."""
        if tuple(flipped.shape) != (self.n,) or str(flipped.dtype) not in ("bool", "torch.bool"):
            raise ValueError(f"flip mask must be bool of shape ({self.n},), got {flipped.dtype} {tuple(flipped.shape)}")
        self._grow()
        if self.torch_device is None:
            f = flipped.cpu().numpy() if _is_torch(flipped) else flipped
            self.flips += f
            item = np.packbits(f) if self._keep_items else None
        else:
            import torch

            f = flipped.to(self.torch_device) if _is_torch(flipped) else torch.from_numpy(flipped).to(self.torch_device)
            self.flips += f
            item = f.clone() if self._keep_items else None
        if self._keep_items:
            self.items.append((item, float(weight)))
        self.total += 1

    def add(self, mask: Any, weight: float = 1.0) -> None:
        """Add one client's dense mask (FedPM), O(N). Weights are normalised to sum to K in :meth:`finish`."""
        if _is_torch(mask):
            if tuple(mask.shape) != (self.n,):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({self.n},)")
            m = mask.bool()
        else:
            m = np.asarray(mask)
            if m.shape != (self.n,):
                raise ValueError(f"mask has shape {m.shape}, expected ({self.n},)")
            m = m.astype(bool, copy=False)
        if self.torch_device is not None and not _is_torch(m):
            import torch

            m = torch.from_numpy(m).to(self.torch_device)
        elif self.torch_device is None and _is_torch(m):
            m = m.cpu().numpy()
        self.add_flip_mask(m ^ self.reference, weight)

    # --- results ------------------------------------------------------------------------------------------
    @property
    def counts_exact(self) -> bool:
        """Whether theta is a function of integer counts (so the counts downlink is exact)."""
        return self.reset and not self.weighted

    def counts(self) -> np.ndarray:
        """How many of the round's masks keep each weight (narrowest unsigned dtype), O(N)."""
        if self.torch_device is None:
            # K - flips where the reference is set, flips elsewhere: flips + r * (K - 2 flips) in the
            # flips' unsigned dtype, whose wrap-around is exact because the result lies in 0..K
            # (three plain passes; a ufunc with where= is ~50x slower, measured at N = 86M)
            f = self.flips
            c = np.multiply(f, 2, dtype=f.dtype)
            np.subtract(f.dtype.type(self.total), c, out=c)
            np.multiply(c, self.reference, out=c)
            np.add(c, f, out=c)
            return c.astype(count_dtype(self.total), copy=False)
        import torch

        f = self.flips.to(torch.int32)
        c = torch.where(self.reference, self.total - f, f)
        return c.cpu().numpy().astype(count_dtype(self.total))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Beta posterior parameters (alpha, beta) after this round's masks, float32."""
        if self._integer_sums:
            return self._finish_integer()
        return self._finish_replay()

    def _finish_integer(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.counts()
        alpha = np.empty(self.n, dtype=np.float32)
        beta = np.empty(self.n, dtype=np.float32)
        a0 = b0 = None
        if not self.reset:
            a0, b0 = self._state.alpha, self._state.beta
            if max(float(a0.max(initial=0)), float(b0.max(initial=0))) + self.total >= F32_EXACT_INT:
                raise RuntimeError("Beta posterior counts reached 2^24: float32 can no longer hold them exactly")
        tot = np.float32(self.total)
        for lo in range(0, self.n, CHUNK):
            hi = min(self.n, lo + CHUNK)
            cf = c[lo:hi].astype(np.float32)
            np.add(cf, np.float32(1) if a0 is None else a0[lo:hi], out=alpha[lo:hi])
            np.subtract(tot, cf, out=cf)
            np.add(cf, np.float32(1) if b0 is None else b0[lo:hi], out=beta[lo:hi])
        return alpha, beta

    def _weights(self) -> list[np.float32]:
        if not self.weighted:
            return [np.float32(1.0)] * len(self.items)
        wsum = sum(w for _, w in self.items)
        return [np.float32(len(self.items) * w / wsum) for _, w in self.items]

    def _finish_replay(self) -> tuple[np.ndarray, np.ndarray]:
        """Replay every client's float32 additions in order (weighted, or non-integer priors)."""
        ws = self._weights()
        if self.torch_device is not None:
            return _replay_torch(self, ws)
        r = self.reference
        if self.reset:
            # indices no client flipped saw the same additions: K of them on alpha where r is set
            touched = np.flatnonzero(self.flips)
            s = sequential_sum_f32(1.0, ws)
            alpha = np.where(r, s, np.float32(1)).astype(np.float32)
            beta = np.where(r, np.float32(1), s).astype(np.float32)
            a_t = np.ones(touched.size, dtype=np.float32)
            b_t = np.ones(touched.size, dtype=np.float32)
            r_t = r[touched]
            for (item, _), w in zip(self.items, ws):
                m_t = r_t.copy()
                if item.dtype == np.uint8:  # packed dense flip mask
                    m_t ^= np.unpackbits(item, count=self.n).view(bool)[touched]
                else:
                    m_t[np.searchsorted(touched, item)] ^= True
                np.add(a_t, w, out=a_t, where=m_t)
                np.add(b_t, w, out=b_t, where=~m_t)
            alpha[touched] = a_t
            beta[touched] = b_t
            return alpha, beta
        alpha = self._state.alpha.copy()
        beta = self._state.beta.copy()
        m = np.empty(self.n, dtype=bool)
        for (item, _), w in zip(self.items, ws):
            if item.dtype == np.uint8:
                np.not_equal(r, np.unpackbits(item, count=self.n).view(bool), out=m)
            else:
                np.copyto(m, r)
                m[item] ^= True
            np.add(alpha, w, out=alpha, where=m)
            np.logical_not(m, out=m)
            np.add(beta, w, out=beta, where=m)
        return alpha, beta

    def theta(self, stat: str, eps: float) -> np.ndarray:
        """The broadcast keep-probabilities: the posterior statistic, clipped, float32."""
        if self.counts_exact:
            from ..codecs.dense import theta_from_counts

            return theta_from_counts(self.counts(), self.total, stat, eps)
        return posterior(*self.finish(), stat, eps)


def _replay_torch(agg: MaskAggregator, ws: list[np.float32]) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`MaskAggregator._finish_replay` on torch tensors (the same float32 additions)."""
    import torch

    dev = agg.torch_device
    r = agg.reference

    def flip_of(item: Any, index: Any = None) -> Any:
        if item.dtype == torch.bool:
            return item if index is None else item[index]
        if index is None:
            f = torch.zeros(agg.n, dtype=torch.bool, device=dev)
            f[torch.from_numpy(item.astype(np.int64)).to(dev)] = True
            return f
        f = torch.zeros(index.numel(), dtype=torch.bool, device=dev)
        f[torch.searchsorted(index, torch.from_numpy(item.astype(np.int64)).to(dev))] = True
        return f

    if agg.reset:
        touched = torch.nonzero(agg.flips).flatten()
        s = float(sequential_sum_f32(1.0, ws))
        one = torch.ones((), dtype=torch.float32, device=dev)
        sv = torch.full((), s, dtype=torch.float32, device=dev)
        alpha = torch.where(r, sv, one)
        beta = torch.where(r, one, sv)
        a_t = torch.ones(touched.numel(), dtype=torch.float32, device=dev)
        b_t = torch.ones(touched.numel(), dtype=torch.float32, device=dev)
        r_t = r[touched]
        for (item, _), w in zip(agg.items, ws):
            m_t = r_t ^ flip_of(item, touched)
            wt = torch.full((), float(w), dtype=torch.float32, device=dev)
            a_t = torch.where(m_t, a_t + wt, a_t)
            b_t = torch.where(m_t, b_t, b_t + wt)
        alpha[touched] = a_t
        beta[touched] = b_t
    else:
        alpha = torch.from_numpy(agg._state.alpha).to(dev, copy=True)
        beta = torch.from_numpy(agg._state.beta).to(dev, copy=True)
        for (item, _), w in zip(agg.items, ws):
            m = r ^ flip_of(item)
            wt = torch.full((), float(w), dtype=torch.float32, device=dev)
            alpha = torch.where(m, alpha + wt, alpha)
            beta = torch.where(m, beta, beta + wt)
    return alpha.cpu().numpy(), beta.cpu().numpy()


def posterior(alpha: np.ndarray, beta: np.ndarray, stat: str, eps: float) -> np.ndarray:
    """Posterior mean or mode of Beta(alpha, beta), clipped to [eps, 1 - eps], float32.

    Computed in float64 blocks of :data:`CHUNK` (bounded temporaries; the same value per element)."""
    if stat not in ("mean", "mode"):
        raise ValueError(f"unknown posterior statistic {stat!r}; valid: mean, mode")
    out = np.empty(alpha.shape, dtype=np.float32)
    af, bf, of = alpha.ravel(), beta.ravel(), out.ravel()
    for lo in range(0, af.size, CHUNK):
        a = af[lo : lo + CHUNK].astype(np.float64)
        b = bf[lo : lo + CHUNK].astype(np.float64)
        if stat == "mean":
            th = a / (a + b)
        else:
            denom = a + b - 2.0
            safe = np.where(denom > 0, denom, 1.0)
            th = np.where(denom > 0, (a - 1.0) / safe, 0.5)
        of[lo : lo + CHUNK] = np.clip(th, eps, 1.0 - eps)
    return out


def fedavg(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted average of same-shaped arrays (float64 accumulation, float32 result)."""
    total = float(sum(weights))
    if not (total > 0 and np.isfinite(total)) or any(not (w >= 0) for w in weights):
        raise ValueError(f"aggregation weights {list(weights)[:8]} must be >= 0 and sum to a finite value > 0")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += (w / total) * a.astype(np.float64)
    return acc.astype(np.float32)

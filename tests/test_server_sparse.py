"""Sparse aggregation (issue 13) against the dense loop it replaced, bit for bit.

``DenseReference`` is the aggregation as it was before: every client's mask expanded to N booleans
and added into float32 alpha/beta and integer counts, one client at a time. It is slow and obvious on
purpose; the tests compare :class:`deltamask.server.MaskAggregator` to it on random cases (weighted
and unweighted, with and without prior resets, integer and non-integer priors, every way a client
can be added, K past the uint8 counter) on numpy and on torch CPU tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltamask.server import MaskAggregator, count_dtype, init_state, posterior


class DenseReference:
    """The pre-issue-13 aggregation: dense masks, O(N) per client, float32 sums in client order."""

    def __init__(self, alpha: np.ndarray, beta: np.ndarray, reset: bool, weighted: bool) -> None:
        self.alpha = np.ones_like(alpha) if reset else alpha.copy()
        self.beta = np.ones_like(beta) if reset else beta.copy()
        self.weighted = weighted
        self.counts = np.zeros(alpha.shape, dtype=np.int64)
        self.items: list[tuple[np.ndarray, float]] = []

    def add(self, mask: np.ndarray, weight: float) -> None:
        m = mask.astype(bool)
        if self.weighted:
            self.items.append((m.copy(), weight))
        else:
            for i in range(m.size):  # element by element: no vectorised shortcut to trust
                if m[i]:
                    self.alpha[i] = np.float32(self.alpha[i] + np.float32(1))
                else:
                    self.beta[i] = np.float32(self.beta[i] + np.float32(1))
        self.counts += m

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.weighted and self.items:
            wsum = sum(w for _, w in self.items)
            for m, w in self.items:
                ww = np.float32(len(self.items) * w / wsum)
                self.alpha += ww * m
                self.beta += ww * ~m
        return self.alpha, self.beta


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def _case(seed: int, weighted: bool, reset: bool, integer_priors: bool, device: object, k_clients: int | None = None,
          n: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(1, 3000))
    k_clients = k_clients or int(rng.integers(1, 13))
    st = init_state(n, 0.5, np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
    st.theta = rng.random(n).astype(np.float32)
    if integer_priors:
        st.alpha = rng.integers(1, 40, n).astype(np.float32)
        st.beta = rng.integers(1, 40, n).astype(np.float32)
    else:
        st.alpha = (1 + 30 * rng.random(n)).astype(np.float32)
        st.beta = (1 + 30 * rng.random(n)).astype(np.float32)
    round_, reset_every = (1, 1) if reset else (2, 0)
    agg = MaskAggregator(st, round_, reset_every, weighted, device=device)
    ref = DenseReference(st.alpha, st.beta, reset, weighted)
    r = st.theta >= 0.5
    for j in range(k_clients):
        density = float(rng.choice([0.0, 0.001, 0.02, 0.3, 1.0]))
        flips = np.flatnonzero(rng.random(n) < density)
        weight = float(rng.integers(1, 500))
        mask = r.copy()
        mask[flips] ^= True
        how = j % 3 if device is None else (j + seed) % 3
        if how == 0:
            agg.add_flips(flips, weight)
        elif how == 1:
            fm = np.zeros(n, dtype=bool)
            fm[flips] = True
            agg.add_flip_mask(fm, weight)
        else:
            agg.add(mask, weight)
        ref.add(mask, weight)
    a_ref, b_ref = ref.finish()
    a, b = agg.finish()
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(_bits(a), _bits(a_ref))
    np.testing.assert_array_equal(_bits(b), _bits(b_ref))
    c = agg.counts()
    assert c.dtype == count_dtype(k_clients)
    np.testing.assert_array_equal(c, ref.counts)
    for stat in ("mean", "mode"):
        np.testing.assert_array_equal(_bits(agg.theta(stat, 0.01)), _bits(posterior(a_ref, b_ref, stat, 0.01)))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("integer_priors", [True, False])
def test_sparse_equals_dense_reference(weighted: bool, reset: bool, integer_priors: bool) -> None:
    for seed in range(6):
        _case(seed, weighted, reset, integer_priors, None)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reset", [True, False])
def test_torch_cpu_path_equals_dense_reference(weighted: bool, reset: bool) -> None:
    for seed in range(3):
        _case(100 + seed, weighted, reset, True, torch.device("cpu"))
    _case(200, weighted, reset, False, torch.device("cpu"))


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_more_than_255_clients_widens_the_counter(device: object) -> None:
    _case(7, False, True, True, device, k_clients=300, n=50)
    _case(8, True, True, True, device, k_clients=260, n=40)


def test_unweighted_integer_sums_take_the_counts_path() -> None:
    """The fast path is the one that runs in the default mode (no per-client items kept)."""
    st = init_state(100, 0.9, np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
    agg = MaskAggregator(st, 1, 1, False)
    agg.add_flips(np.array([3, 7, 50]))
    assert agg.items == [] and agg.flips.dtype == np.uint8 and agg.counts_exact
    assert MaskAggregator(st, 2, 0, True).items == [] and MaskAggregator(st, 2, 0, True)._keep_items


def test_bad_input_is_refused_with_a_clear_error() -> None:
    st = init_state(10, 0.9, np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
    agg = MaskAggregator(st, 1, 1, False)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        agg.add_flips(np.array([2, 10]))
    with pytest.raises(ValueError, match="sorted and distinct"):
        agg.add_flips(np.array([4, 2]))
    with pytest.raises(ValueError, match="1-D integer"):
        agg.add_flips(np.array([0.5]))
    with pytest.raises(ValueError, match="bool of shape"):
        agg.add_flip_mask(np.zeros(9, bool))
    with pytest.raises(ValueError, match="shape"):
        agg.add(np.zeros(11, bool))
    st.alpha = st.beta = None
    with pytest.raises(ValueError, match="reset_every"):
        MaskAggregator(st, 2, 0, False)
    assert agg.total == 0

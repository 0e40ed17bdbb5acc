"""Sparse aggregation (issue 13) against the dense loop it replaced, bit for bit.

``DenseReference`` is the aggregation as it was before: every client's mask expanded to N booleans
and added into float32 alpha/beta and integer counts, one client at a time. It is slow and obvious on
purpose; the tests compare :class:`deltamask.fl.aggregation.MaskAggregator` to it on random cases (weighted
and unweighted, with and without prior resets, integer and non-integer priors, every way a client
can be added, K past the uint8 counter) on numpy and on torch CPU tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltamask.fl.aggregation import MaskAggregator, count_dtype, init_state, posterior


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


# --- the method's aggregate (decode + aggregate + theta) against the dense path -----------------------

@pytest.fixture(scope="module")
def tiny_net():  # type: ignore[no-untyped-def]
    from dmtest import tiny_config

    from deltamask.run.experiment import build_experiment

    return build_experiment(tiny_config(), test=False).net


@pytest.mark.parametrize(
    "overrides",
    [
        {"codec": "ans"},
        {"codec": "golomb", "weighted": True},
        {"codec": "ans", "reset_every": 0},
        {"codec": "ans", "reset_every": 0, "weighted": True},
        {"codec": "fuse8", "weighted": True, "reset_every": 2, "posterior": "mean"},
        {"codec": "fuse8"},
        {"codec": "auto", "reset_every": 3},
        {"method": "fedpm", "codec": "bitpack", "weighted": True},
        {"method": "fedpm", "codec": "bernoulli-ans", "reset_every": 0},
    ],
)
def test_method_aggregate_equals_dense_path(tiny_net, overrides: dict) -> None:  # type: ignore[no-untyped-def]
    """Replies decoded densely (``decode_mask``, ``r XOR member``), aggregated by the dense loop, theta
    through an actual encode/decode of the downlink: what the server did before issue 13."""
    from dmtest import tiny_config

    from deltamask.codecs import codec_of, get_codec
    from deltamask.methods import Reply, create_method

    cfg = tiny_config(**{"max_flip_fraction": 1.0, "flip_outlier": 0.0, **overrides})  # synthetic flips of 0.1-5% of N
    method = create_method(cfg, tiny_net)
    n = method.n
    rng = np.random.default_rng(len(str(overrides)))
    state = method.init_state()
    state.theta = rng.random(n).astype(np.float32)
    state.theta_version = 5
    if cfg.reset_every != 1:
        state.alpha = (1 + 20 * rng.random(n)).astype(np.float32)
        state.beta = (1 + 20 * rng.random(n)).astype(np.float32)
    round_ = cfg.head_warmup_rounds + 2  # a mask round that resets only when reset_every == 1
    reset = cfg.reset_every > 0 and (round_ - 1) % cfg.reset_every == 0
    r = state.theta >= 0.5
    replies, masks = [], []
    for cid in range(4):
        if cfg.method == "fedpm":
            m = rng.random(n) < state.theta
            payload = method.mask_codec.encode(m, probs=state.theta)
            dense = codec_of(payload).decode(payload, probs=state.theta)
        else:
            flips = np.flatnonzero(rng.random(n) < rng.choice([0.001, 0.01, 0.05]))
            payload = method.index_codec.encode(flips, n, seed=cid)
            dense = r ^ codec_of(payload).decode_mask(payload)
        replies.append(Reply(cid, payload, int(rng.integers(5, 50))))
        masks.append(dense)
    ref = DenseReference(state.alpha if state.alpha is not None else np.ones(n, np.float32),
                         state.beta if state.beta is not None else np.ones(n, np.float32), reset, cfg.weighted)
    for rep, m in zip(replies, masks):
        ref.add(m, rep.num_samples)
    a_ref, b_ref = ref.finish()
    theta_ref = posterior(a_ref, b_ref, cfg.posterior, cfg.eps)
    exact = reset and not cfg.weighted
    down = method.counts_codec if exact else get_codec("probs-q8")
    payload = down.encode(theta_ref, ref.counts if exact else None, len(replies) if exact else None)
    theta_ref = codec_of(payload).decode(payload)

    info = method.aggregate(state, replies, round_)
    assert info.num_good == 4 and not info.dropped
    np.testing.assert_array_equal(_bits(state.theta), _bits(theta_ref))
    if exact:
        np.testing.assert_array_equal(state.counts, ref.counts)
        assert state.counts.dtype == np.uint8 and state.counts_total == 4
    else:
        assert state.counts is None
    if cfg.reset_every != 1:
        np.testing.assert_array_equal(_bits(state.alpha), _bits(a_ref))
        np.testing.assert_array_equal(_bits(state.beta), _bits(b_ref))
    else:
        assert state.alpha is None and state.beta is None  # the default mode keeps no posterior arrays
    assert method.theta_payload(state) == payload  # the clients get the same bytes as before


def test_auto_downlink_uses_rans_from_a_million_weights() -> None:
    from deltamask.codecs.dense import ProbsCountsCodec
    from deltamask.codecs.rans import ProbsCountsRansCodec
    from deltamask.methods.masks import RANS_MIN_N, auto_counts_codec

    small, big = auto_counts_codec(RANS_MIN_N - 1, "mode", 0.01), auto_counts_codec(RANS_MIN_N, "mode", 0.01)
    assert type(small) is ProbsCountsCodec and type(big) is ProbsCountsRansCodec
    assert (big.stat, big.eps) == ("mode", 0.01)

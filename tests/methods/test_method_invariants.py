"""Method invariants pinned against slow-but-obvious references (issue 10, item 6).

Each reference below is a few lines of numpy (or plain Python loops) written from METHOD.md, not from
the library, and each test compares *values* element for element:

* the straight-through gradient: ``d L / d s = dL/dm * sigmoid'(s)`` for a known loss through the sampled mask;
* the client's reference mask ``r = [theta_g >= 0.5]``, the delta it sends, and the server's rebuilt mask
  ``m_hat = r XOR D_hat``: equal to the client's sampled mask, including at ``theta_g == 0.5`` exactly;
* top-kappa: the ``ceil(kappa |D|)`` changed bits with the largest ``|theta_k - theta_g|`` are kept
  (ties: the lower index first, as the client's stable sort does);
* the aggregator: ``alpha = prior + sum_k w_k m_k``, ``beta = prior + sum_k w_k (1 - m_k)`` (weights normalised to sum
  to K), integer counts, priors reset to Beta(1, 1) at rounds 1, 1 + R, 1 + 2R, ... (R = reset_every; 0 = never);
* the posterior: mean ``a / (a + b)`` or mode ``(a - 1) / (a + b - 2)`` (0.5 where undefined), clipped to
  ``[eps, 1 - eps]``; the broadcast theta is what the clients decode.

Everything goes through public behaviour (``Method.downlink``, ``client_update``, ``aggregate``, the codecs'
``encode``/``decode``, ``posterior``, ``MaskedNetwork``), so the tests hold for any implementation of those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmtest import tiny_config
from deltamask.fl import seeding
from deltamask.codecs import codec_of, get_codec
from deltamask.run.experiment import build_experiment
from deltamask.methods import ClientContext, Reply, create_method
from deltamask.codecs.bundle import join_bundle, parts_by_kind
from deltamask.fl.aggregation import posterior

EPS = 0.01
WARMUP = 1  # round 1 trains the head; rounds 2.. train masks


@pytest.fixture(scope="module")
def exp():  # type: ignore[no-untyped-def]
    return build_experiment(tiny_config(method="deltamask", head_warmup_rounds=WARMUP))


def _method(exp, **kw):  # type: ignore[no-untyped-def]
    """A method over the module's network with the given config (downlink theta sent exactly as float32)."""
    # crafted masks are whole samples, not kappa-limited deltas: the flip cap and outlier rule (tests/methods/test_attacks.py) stay off
    cfg = tiny_config(**{"head_warmup_rounds": WARMUP, "downlink_codec": "probs-f32", "eps": EPS, "min_replies": 1,
                         "max_flip_fraction": 1.0, "flip_outlier": 0.0, **kw})
    return create_method(cfg, exp.net)


def _theta_with_halves(n: int, seed: int) -> np.ndarray:
    """Global keep-probabilities in (0, 1), a third of them exactly 0.5 (where >= and > disagree)."""
    rng = np.random.default_rng(seed)
    th = rng.uniform(0.02, 0.98, n).astype(np.float32)
    th[rng.random(n) < 1 / 3] = 0.5
    return th


def _install_theta(method, theta: np.ndarray, zero_head: bool = False):  # type: ignore[no-untyped-def]
    state = method.init_state()
    state.theta = theta.copy()
    rng = np.random.default_rng(1)  # a non-zero head, so that the scores get gradients and move
    state.head_weight = rng.standard_normal(state.head_weight.shape).astype(np.float32) * (not zero_head)
    state.head_bias = rng.standard_normal(state.head_bias.shape).astype(np.float32) * (not zero_head)
    state.theta_version += 1  # a new version of theta: registered, as aggregate registers the versions it makes
    method.sync.register(state, None, state.round)
    return state


# --- reference implementations (numpy / loops, from METHOD.md) ---------------------------------------------
def ref_client_sample(theta_k: np.ndarray, seed: int, rnd: int, cid: int) -> np.ndarray:
    """m_k ~ Bernoulli(theta_k), drawn as u < theta_k with the (seed, round, client, 'mask-sample') stream."""
    u = torch.rand(theta_k.shape, generator=seeding.generator(seed, rnd, cid, "mask-sample")).numpy()
    return u < theta_k


def ref_reference_mask(theta_g: np.ndarray) -> np.ndarray:
    return np.array([t >= 0.5 for t in theta_g.tolist()], dtype=bool)


def ref_top_kappa(m_k: np.ndarray, theta_k: np.ndarray, theta_g: np.ndarray, kappa: float) -> list[int]:
    """Changed bits, largest |theta_k - theta_g| first (ties: lower index first), the first ceil(kappa |D|)."""
    r = ref_reference_mask(theta_g)
    changed = [i for i in range(m_k.size) if m_k[i] != r[i]]
    change = np.abs(theta_k.astype(np.float32) - theta_g.astype(np.float32))
    ranked = sorted(changed, key=lambda i: (-float(change[i]), i))
    return ranked[: math.ceil(kappa * len(changed))]


def ref_posterior(alpha: np.ndarray, beta: np.ndarray, stat: str, eps: float) -> np.ndarray:
    out = []
    for a, b in zip(alpha.tolist(), beta.tolist()):
        if stat == "mean":
            t = a / (a + b)
        else:
            t = (a - 1) / (a + b - 2) if a + b > 2 else 0.5
        out.append(min(max(t, eps), 1 - eps))
    return np.array(out, dtype=np.float32)


def ref_aggregate(alpha, beta, masks, weights, rnd: int, reset_every: int, weighted: bool, memory: float = 0.0):  # type: ignore[no-untyped-def]
    """(alpha, beta, counts) after one round; with a ``memory`` m > 0 no reset, the earlier evidence
    decays: alpha = 1 + m (alpha - 1) before the round's masks are added (issue 25)."""
    if memory > 0:
        alpha, beta = 1 + memory * (alpha.astype(np.float64) - 1), 1 + memory * (beta.astype(np.float64) - 1)
    elif reset_every > 0 and (rnd - 1) % reset_every == 0:
        alpha, beta = np.ones_like(alpha, dtype=np.float64), np.ones_like(beta, dtype=np.float64)
    else:
        alpha, beta = alpha.astype(np.float64), beta.astype(np.float64)
    k = len(masks)
    w = [k * x / sum(weights) for x in weights] if weighted else [1.0] * k
    counts = np.zeros(alpha.shape, np.int64)
    for m, wk in zip(masks, w):
        alpha = alpha + wk * m
        beta = beta + wk * (1 - m.astype(np.int64))
        counts += m
    return alpha, beta, counts


# --- the straight-through gradient --------------------------------------------------------------------------
def test_straight_through_gradient_value(exp) -> None:  # noqa: ANN001
    """L = sum_j <c_j, W_j * m_j> over the masked tensors. Forward: W * m with m = [u < sigmoid(s)].
    Backward (straight-through): dL/dm = c * W, dm/dtheta = 1, dtheta/ds = theta (1 - theta)."""
    net = exp.net
    n = net.num_masked
    rng = np.random.default_rng(3)
    theta = rng.uniform(0.05, 0.95, n).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    net.set_scores_from_probs(torch.from_numpy(theta), EPS)
    s = net.scores.detach().numpy().astype(np.float64)
    net.scores.requires_grad_(True)
    net.scores.grad = None
    try:
        net.use_sampled_mask(torch.Generator().manual_seed(11))
        loss = 0.0
        w_orig, w_used = [], []
        for name, off, shape in zip(net.masked_names, net.offsets, net.shapes):
            mod_name, _, attr = name.rpartition(".")
            mod = net.backbone.root.get_submodule(mod_name)
            k = int(np.prod(shape))
            used = getattr(mod, attr)  # the parametrized weight the forward pass computes with
            loss = loss + (torch.from_numpy(c[off : off + k]).view(shape) * used).sum()
            w_orig.append(mod.parametrizations[attr].original.detach().numpy().ravel())
            w_used.append(used.detach().numpy().ravel())
        loss.backward()
        grad = net.scores.grad.detach().numpy().astype(np.float64)
    finally:
        net.use_fixed_mask(None)
        net.scores.requires_grad_(False)
        net.scores.grad = None
    W = np.concatenate(w_orig).astype(np.float64)
    sig = 1 / (1 + np.exp(-s))
    u = torch.rand(n, generator=torch.Generator().manual_seed(11)).numpy()
    m = u < sig.astype(np.float32)
    np.testing.assert_allclose(np.concatenate(w_used), W * m, rtol=1e-6, atol=0)  # forward: W * m
    ref = c.astype(np.float64) * W * sig * (1 - sig)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-9)


# --- reference mask, delta, rebuilt mask ------------------------------------------------------------------------
def _client_round(method, state, exp, cid: int, rnd: int):  # type: ignore[no-untyped-def]
    """(reply, theta_g as sent, theta_k after training) for one client's mask round."""
    theta_g = state.theta.copy()
    down = method.downlink(state, cid, rnd)
    reply = method.client_update(down, exp.client_data(cid), ClientContext(rnd, cid, method.cfg.seed, {}))
    theta_k = method.net.probs().detach().clamp(EPS, 1 - EPS).numpy().copy()
    return reply, theta_g, theta_k


def _sent_indices(reply: Reply) -> np.ndarray:
    part = parts_by_kind(reply.payload)["indices"]
    return np.sort(codec_of(part).decode(part))


def test_client_delta_and_server_rebuilt_mask_equal_the_sampled_mask(exp) -> None:  # noqa: ANN001
    """kappa = 1 and an exact codec: the client sends D = {i : m_k[i] != [theta_g[i] >= 0.5]}; the server's
    m_hat = [theta_g >= 0.5] XOR D equals m_k element for element (seen in theta: K=1, reset, mode => m_hat
    clipped to [eps, 1-eps]), also where theta_g is exactly 0.5."""
    rnd, cid = WARMUP + 1, 1
    method = _method(exp, method="deltamask", codec="golomb", kappa=1.0, reset_every=1, posterior="mode")
    state = _install_theta(method, _theta_with_halves(method.n, 5))
    reply, theta_g, theta_k = _client_round(method, state, exp, cid, rnd)
    np.testing.assert_array_equal(theta_g, state.theta)
    m_k = ref_client_sample(theta_k, method.cfg.seed, rnd, cid)
    r = ref_reference_mask(theta_g)
    halves = theta_g == 0.5
    assert halves.sum() > 1000 and (m_k[halves] != r[halves]).sum() > 100  # the case that pins >= is exercised
    np.testing.assert_array_equal(_sent_indices(reply), np.flatnonzero(m_k != r))  # the client side
    agg = method.aggregate(state, [reply], rnd)
    assert agg.num_good == 1 and not agg.skipped
    m_hat = state.theta > 0.5
    np.testing.assert_array_equal(state.theta, np.where(m_k, 1 - EPS, EPS).astype(np.float32))  # the server side
    np.testing.assert_array_equal(m_hat, m_k)


def test_fedpm_server_mask_is_the_clients_sample(exp) -> None:  # noqa: ANN001
    rnd, cid = WARMUP + 1, 2
    method = _method(exp, method="fedpm", codec="bitpack", reset_every=1, posterior="mode")
    state = _install_theta(method, _theta_with_halves(method.n, 6))
    reply, _, theta_k = _client_round(method, state, exp, cid, rnd)
    m_k = ref_client_sample(theta_k, method.cfg.seed, rnd, cid)
    method.aggregate(state, [reply], rnd)
    np.testing.assert_array_equal(state.theta, np.where(m_k, 1 - EPS, EPS).astype(np.float32))


# --- top-kappa --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kappa", [0.3, 0.05])
def test_top_kappa_keeps_the_largest_changes(exp, kappa: float) -> None:  # noqa: ANN001
    rnd, cid = WARMUP + 1, 0
    method = _method(exp, method="deltamask", codec="golomb", kappa=kappa, kappa_schedule="constant")
    state = _install_theta(method, _theta_with_halves(method.n, 7))
    reply, theta_g, theta_k = _client_round(method, state, exp, cid, rnd)
    m_k = ref_client_sample(theta_k, method.cfg.seed, rnd, cid)
    kept_ref = ref_top_kappa(m_k, theta_k, theta_g, kappa)
    sent = _sent_indices(reply)
    change = np.abs(theta_k - theta_g)
    changed = np.flatnonzero(m_k != ref_reference_mask(theta_g))
    dropped = np.setdiff1d(changed, sent)
    assert sent.size == math.ceil(kappa * changed.size) and dropped.size > 0
    assert change[sent].min() >= change[dropped].max()  # nothing dropped changed more than something kept
    assert len(set(change[changed].tolist())) > 10  # the ranking is not decided by ties alone
    np.testing.assert_array_equal(sent, np.sort(kept_ref))
    assert reply.metrics["kappa"] == kappa and reply.metrics["num_keys"] == len(kept_ref)


def test_top_kappa_ties_keep_the_lower_index(exp) -> None:  # noqa: ANN001
    """With a zero head the scores get no gradient, so theta_k is a function of theta_g alone: theta_g with
    three values gives three groups of equal change, and the cut falls inside one. The client's ranking is a
    stable sort, so among equal changes the lower index is kept (deterministic payloads)."""
    rnd, cid = WARMUP + 1, 0
    method = _method(exp, method="deltamask", codec="golomb", kappa=0.5)
    theta_g = np.random.default_rng(4).choice(np.array([0.3, 0.5, 0.8], np.float32), method.n)
    state = _install_theta(method, theta_g, zero_head=True)
    reply, theta_g, theta_k = _client_round(method, state, exp, cid, rnd)
    m_k = ref_client_sample(theta_k, method.cfg.seed, rnd, cid)
    kept_ref = ref_top_kappa(m_k, theta_k, theta_g, 0.5)
    sent = _sent_indices(reply)
    change = np.abs(theta_k - theta_g)
    dropped = np.setdiff1d(np.flatnonzero(m_k != ref_reference_mask(theta_g)), sent)
    assert change[sent].min() == change[dropped].max()  # the cut falls inside a group of ties
    np.testing.assert_array_equal(sent, np.sort(kept_ref))


# --- aggregation counts and the posterior over rounds ---------------------------------------------------------
def _crafted_reply(method, cid: int, m: np.ndarray, theta_g: np.ndarray, samples: int) -> Reply:  # type: ignore[no-untyped-def]
    """What a client with sampled mask ``m`` sends, built with the public codecs."""
    if method.cfg.method == "deltamask":
        d = np.flatnonzero(m != ref_reference_mask(theta_g)).astype(np.int64)
        part = get_codec("golomb", kind="indices").encode(d, method.n, seed=cid)
    else:
        part = get_codec("bitpack", kind="mask").encode(m)
    return Reply(cid, join_bundle([part]), samples)


@pytest.mark.parametrize(
    "method_name,reset_every,stat,weighted,memory",
    [
        ("deltamask", 1, "mean", False, 0.0),
        ("deltamask", 0, "mode", False, 0.0),
        ("deltamask", 2, "mean", True, 0.0),
        ("fedpm", 2, "mode", False, 0.0),
        ("fedpm", 0, "mean", True, 0.0),
        ("deltamask", 1, "mode", False, 0.5),
        ("fedpm", 0, "mean", True, 0.7),
    ],
)
def test_aggregation_and_posterior_over_rounds(exp, method_name: str, reset_every: int, stat: str, weighted: bool, memory: float) -> None:  # noqa: ANN001
    """Three mask rounds of three clients with known masks; after each round alpha, beta, the counts and the
    broadcast theta equal the reference (priors reset at rounds 1, 1 + R, ...)."""
    method = _method(exp, method=method_name, codec="golomb" if method_name == "deltamask" else "bitpack",
                     reset_every=reset_every, posterior=stat, weighted=weighted, posterior_memory=memory)
    state = _install_theta(method, _theta_with_halves(method.n, 8))
    n = method.n
    rng = np.random.default_rng(9)
    alpha, beta = np.ones(n), np.ones(n)
    for rnd in range(WARMUP + 1, WARMUP + 4):
        theta_g = state.theta.copy()
        masks = [rng.random(n) < theta_g for _ in range(3)]
        for m in masks:  # kept by every client / by none: the mode is 1 / 0 and eps clipping bites
            m[:50], m[50:100] = True, False
        samples = [10, 30, 20]
        replies = [_crafted_reply(method, c, m, theta_g, s) for c, m, s in zip((0, 1, 2), masks, samples)]
        agg = method.aggregate(state, replies, rnd)
        assert agg.num_good == 3 and not agg.dropped
        alpha, beta, counts = ref_aggregate(alpha, beta, masks, samples, rnd, reset_every, weighted, memory)
        if memory > 0:
            assert state.alpha is not None and state.counts is None  # the posterior carries over; not a function of counts
        if state.alpha is not None or reset_every != 1:  # with a reset every round the counts may be all it keeps
            np.testing.assert_allclose(state.alpha, alpha, rtol=1e-6, err_msg=f"alpha, round {rnd}")
            np.testing.assert_allclose(state.beta, beta, rtol=1e-6, err_msg=f"beta, round {rnd}")
        if reset_every == 1 and not weighted and memory == 0:  # theta is a function of the integer counts (counts downlink)
            np.testing.assert_array_equal(state.counts, counts)
            assert state.counts_total == 3
        want = ref_posterior(alpha, beta, stat, EPS)
        np.testing.assert_allclose(state.theta, want, rtol=2e-6, atol=0, err_msg=f"theta, round {rnd}")
        if stat == "mode":  # kept by all / by none: the mode is 1 / 0, clipped
            assert (state.theta[:50] == np.float32(1 - EPS)).all() and (state.theta[50:100] == np.float32(EPS)).all()


def test_posterior_function_by_hand() -> None:
    a = np.array([1, 3, 1, 5, 1, 2, 101, 1], np.float32)
    b = np.array([1, 1, 3, 5, 2, 1, 1, 101], np.float32)
    np.testing.assert_array_equal(posterior(a, b, "mean", EPS), ref_posterior(a, b, "mean", EPS))
    np.testing.assert_array_equal(posterior(a, b, "mode", EPS), ref_posterior(a, b, "mode", EPS))
    # the values themselves, written out
    np.testing.assert_allclose(posterior(a, b, "mean", EPS), [0.5, 0.75, 0.25, 0.5, 1 / 3, 2 / 3, 0.99, 0.01], rtol=1e-6)
    np.testing.assert_allclose(posterior(a, b, "mode", EPS), [0.5, 0.99, 0.01, 0.5, 0.01, 0.99, 0.99, 0.01], rtol=1e-6)
    with pytest.raises(ValueError, match="mean, mode"):
        posterior(a, b, "median", EPS)

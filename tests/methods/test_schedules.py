"""Schedules end to end (issue 9): every setting that shapes theta over rounds, run through the real round
driver, checked round by round against an obvious dense re-computation from the clients' own payloads
(METHOD.md step 8: ``alpha += w m_hat``, ``beta += w (1 - m_hat)``, priors reset every ``reset_every``
rounds, posterior mean or mode, clipped to ``[eps, 1 - eps]``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dmtest import tiny_config

from deltamask.codecs import codec_of
from deltamask.engines.local import LocalTransport
from deltamask.run.experiment import build_experiment
from deltamask.codecs.bundle import parts_by_kind
from deltamask.run.round import run_rounds

Q8 = 1 / 510 + 1e-6  # theta goes down as 8-bit levels whenever it is not a function of one round's counts


def _recorded_run(tmp_path, **over):
    cfg = tiny_config(**{"rounds": 6, "num_clients": 4, "clients_per_round": 3, **over})
    exp = build_experiment(cfg)
    rounds: list[dict] = []
    real = exp.method.aggregate

    def aggregate(state, replies, rnd):
        before = state.theta.copy()
        info = real(state, replies, rnd)
        rounds.append({"round": rnd, "phase": info.phase, "before": before, "after": state.theta.copy(),
                       "replies": [(r.payload, r.num_samples, dict(r.metrics)) for r in replies]})
        return info

    exp.method.aggregate = aggregate
    init = exp.method.init_state
    exp.method.init_state = lambda: (s := init(), rounds.append({"init": s.theta.copy()}))[0]  # type: ignore[func-returns-value]
    run_rounds(exp, LocalTransport(exp), tmp_path)
    return cfg, exp, rounds


def _client_mask(payload: bytes, theta_g: np.ndarray, n: int) -> np.ndarray:
    """m_hat = [theta_g >= 0.5] XOR (the indices the client sent), decoded by the index codec itself."""
    part = parts_by_kind(payload)["indices"]
    idx = codec_of(part).decode(part)
    flips = np.zeros(n, dtype=bool)
    flips[idx] = True
    return (theta_g >= 0.5) ^ flips


def _reference(cfg, rounds):
    """theta after each mask round, recomputed densely from the recorded payloads (no server code)."""
    alpha = beta = None
    out = []
    for mask_i, r in enumerate(x for x in rounds if x.get("phase") == "mask"):
        n = r["before"].size
        if alpha is None or (cfg.reset_every > 0 and (r["round"] - 1) % cfg.reset_every == 0):
            alpha, beta = np.ones(n, np.float32), np.ones(n, np.float32)
        nums = [num for _, num, _ in r["replies"]]
        for payload, num, _ in r["replies"]:
            m = _client_mask(payload, r["before"], n).astype(np.float32)
            # weighted: sample counts scaled to sum to the number of clients (the prior keeps its strength)
            w = np.float32(len(nums) * num / sum(nums) if cfg.weighted else 1.0)
            alpha = alpha + w * m
            beta = beta + w * (np.float32(1) - m)
        a, b = alpha.astype(np.float64), beta.astype(np.float64)
        th = a / (a + b) if cfg.posterior == "mean" else np.where(a + b > 2, (a - 1) / np.maximum(a + b - 2, 1e-300), 0.5)
        out.append(np.clip(th, cfg.eps, 1 - cfg.eps))
    return out


@pytest.mark.parametrize("over", [
    {},
    {"reset_every": 0},
    {"reset_every": 2},
    {"posterior": "mean"},
    {"weighted": True},
    {"eps": 0.05, "theta0": 0.9},
    {"reset_every": 0, "posterior": "mean", "weighted": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_schedule_matches_a_dense_recomputation(tmp_path, over) -> None:
    cfg, exp, rounds = _recorded_run(tmp_path, **over)
    init = rounds[0]["init"]
    assert np.abs(init - cfg.theta0).max() <= Q8  # theta0 as the clients decode it
    ref = _reference(cfg, rounds[1:])
    got = [r["after"] for r in rounds[1:] if r.get("phase") == "mask"]
    assert len(got) == len(ref) == cfg.rounds - cfg.head_warmup_rounds
    exact = cfg.reset_every == 1 and not cfg.weighted
    for g, want in zip(got, ref):
        if exact:  # counts down: the very float32 the reference gives
            np.testing.assert_array_equal(g, want.astype(np.float32))
        else:
            assert np.abs(g.astype(np.float64) - want).max() <= Q8
        lo, hi = cfg.eps, 1 - cfg.eps
        assert g.min() >= lo - Q8 and g.max() <= hi + Q8


def test_the_schedules_differ_where_they_should(tmp_path) -> None:
    """Guard against a setting being ignored: each changes theta after its first effective round."""
    base = _recorded_run(tmp_path / "a")[2]
    for i, over in enumerate(({"reset_every": 0}, {"posterior": "mean"}, {"weighted": True}, {"eps": 0.05})):
        other = _recorded_run(tmp_path / f"b{i}", **over)[2]
        a = [r["after"] for r in base[1:] if r.get("phase") == "mask"]
        b = [r["after"] for r in other[1:] if r.get("phase") == "mask"]
        assert any(not np.array_equal(x, y) for x, y in zip(a, b)), over


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_kappa_schedule_end_to_end(tmp_path, schedule: str) -> None:
    cfg, _, rounds = _recorded_run(tmp_path, kappa_schedule=schedule, kappa=0.6, kappa_min=0.1, rounds=7)
    mask_rounds = [r for r in rounds[1:] if r.get("phase") == "mask"]
    total = len(mask_rounds)
    for i, r in enumerate(mask_rounds):
        t = i / (total - 1)
        want = 0.6 if schedule == "constant" else 0.1 + 0.5 * (0.6 - 0.1) * (1 + math.cos(math.pi * t))
        for payload, _, metrics in r["replies"]:
            assert metrics["kappa"] == pytest.approx(want)
            # the client kept ceil(kappa * |delta|) of its delta
            assert metrics["num_keys"] == math.ceil(want * metrics["delta_size"])


def test_kappa_rank_logit_keeps_the_largest_logit_moves(tmp_path) -> None:
    """kappa_rank=logit: the kept indices are exactly the top ceil(kappa |delta|) by |logit change|, against a
    direct re-ranking of the client's own theta_k (read back from its training), and differ from 'change'."""
    from deltamask.methods.masks import rank_scores

    rng = np.random.default_rng(4)
    tk = rng.uniform(0.0, 1.0, 2000).astype(np.float32)
    tg = np.clip(tk + rng.normal(0, 0.1, tk.size), 0.01, 0.99).astype(np.float32)
    lg = lambda p: math.log(min(max(p, 0.01), 0.99) / (1 - min(max(p, 0.01), 0.99)))
    want = [abs(lg(float(a)) - lg(float(b))) for a, b in zip(tk, tg)]
    np.testing.assert_allclose(rank_scores(tk, tg, "logit", 0.01), want, rtol=1e-9)
    np.testing.assert_array_equal(rank_scores(tk, tg, "change", 0.01), np.abs(tk - tg))
    a = _recorded_run(tmp_path / "c", kappa=0.3, rounds=3)[2]
    b = _recorded_run(tmp_path / "l", kappa=0.3, rounds=3, kappa_rank="logit")[2]
    pa = [p for r in a[1:] if r.get("phase") == "mask" for p, _, _ in r["replies"]]
    pb = [p for r in b[1:] if r.get("phase") == "mask" for p, _, _ in r["replies"]]
    assert pa[0] != pb[0]  # the same clients and masks, other indices kept

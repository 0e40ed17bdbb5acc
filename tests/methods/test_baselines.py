"""The weight-training baselines: end to end on digits, sync of the global weights, error feedback,
majority vote, LoRA layout, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmtest import tiny_config
from deltamask.codecs.quant import wire_bytes
from deltamask.config import ConfigError
from deltamask.engines.local import run_local
from deltamask.run.experiment import build_experiment
from deltamask.methods import ClientContext, ClientFailure, create_method
from deltamask.methods.weights import MODE_DENSE, MODE_NONE, MODE_UPDATES
from deltamask.run.metrics import TIMING_KEYS, read_jsonl

BASELINES = ["fedavg", "qsgd", "signsgd", "topk", "drive", "eden", "lora"]


@pytest.fixture(scope="module")
def exp():  # type: ignore[no-untyped-def]
    return build_experiment(tiny_config(method="fedavg"))


@pytest.mark.parametrize("method", BASELINES)
def test_two_rounds_end_to_end(tmp_path, method: str) -> None:
    cfg = tiny_config(method=method, rounds=2, weight_lr=1e-3)
    s = run_local(cfg, tmp_path)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in recs] == ["head", "weights"]
    n = s["num_masked_params"]
    r = recs[1]
    assert r["num_aggregated"] == 2 and not r["failures"] and r["accuracy"] is not None
    per_client = [c["bits"] for c in r["clients"]]
    assert sum(per_client) == r["uplink_bits"]
    expected = {
        "fedavg": 8 * (40 + 9 + 4 * n),
        "signsgd": 8 * wire_bytes("sign1", n),
        "drive": 8 * wire_bytes("drive", n, block=cfg.rotation_block),
        "eden": 8 * wire_bytes("eden", n, bits=cfg.eden_bits, block=cfg.rotation_block),
    }
    if method in expected:
        assert per_client == [expected[method]] * 2
    else:
        assert 0 < r["uplink_bpp"] < 32
    # the trained weights travel with the model artifact
    from safetensors.numpy import load_file

    art = load_file(str(tmp_path / "model.safetensors"))
    assert art["weights.delta"].shape == (n,) and np.abs(art["weights.delta"]).sum() > 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["method"] == method


def test_artifact_applies_the_trained_weights(tmp_path) -> None:
    from deltamask.run.artifact import load_artifact
    from deltamask.fl.training import evaluate

    cfg = tiny_config(method="fedavg", rounds=2, weight_lr=1e-2)
    run_local(cfg, tmp_path)
    model = load_artifact(tmp_path / "model.safetensors")
    assert model.net._delta is not None and torch.count_nonzero(model.net._delta) > 0
    exp = build_experiment(cfg)  # same seed: the same random backbone as the run
    with torch.no_grad():
        exp.net.head.weight.copy_(model.net.head.weight)
        exp.net.head.bias.copy_(model.net.head.bias)
    exp.net.use_weight_delta(model.net._delta)
    acc, _ = evaluate(exp.net, exp.test_h, exp.test_y, None)
    assert acc == pytest.approx(read_jsonl(tmp_path / "metrics.jsonl")[-1]["accuracy"])


def _round(method, state, rnd: int, clients: list[int], exp, cstates: dict) -> list[int]:  # type: ignore[no-untyped-def]
    """One round by hand; checks every client's copy of v against the server's; returns sync modes."""
    replies, modes = [], []
    for cid in clients:
        v_before = state.extra["v"].copy()
        down = method.downlink(state, cid, rnd)
        modes.append(int(method.manifest.decode(down[: 40 + 40])[1]))  # the i64 manifest: 40 B + 5 fields
        ctx = ClientContext(rnd, cid, 0, cstates.setdefault(cid, {}))
        replies.append(method.client_update(down, exp.client_data(cid), ctx))
        np.testing.assert_array_equal(ctx.state["v"], v_before)
    info = method.aggregate(state, replies, rnd)
    assert not info.dropped
    return modes


@pytest.mark.parametrize("name,extra", [("signsgd", {"signsgd_mode": "vote"}), ("fedavg", {})])
def test_stale_clients_receive_missed_updates_or_dense_weights(exp, name: str, extra: dict) -> None:
    cfg = tiny_config(method=name, weight_lr=1e-3, **extra)
    method = create_method(cfg, exp.net)
    state, cs = method.init_state(), {}
    assert _round(method, state, 1, [0, 1], exp, cs) == [MODE_NONE, MODE_NONE]  # head round
    assert _round(method, state, 2, [0, 1], exp, cs) == [MODE_NONE, MODE_NONE]  # everyone holds v0
    assert _round(method, state, 3, [1, 2], exp, cs) == [MODE_UPDATES if name == "signsgd" else MODE_DENSE] * 2
    modes = _round(method, state, 4, [0, 2], exp, cs)
    # client 0 missed two 1-bit updates (cheaper than dense), or gets dense fp32 v_g for fedavg
    assert modes == ([MODE_UPDATES, MODE_UPDATES] if name == "signsgd" else [MODE_DENSE, MODE_DENSE])
    assert state.theta_version == 3
    if name != "signsgd":
        return
    # a client that lost its cache fails loudly instead of training on wrong weights
    state.client_theta_version[1] = 1
    down = method.downlink(state, 1, 5)
    with pytest.raises(ClientFailure, match="holds 0"):
        method.client_update(down, exp.client_data(1), ClientContext(5, 1, 0, {"head_weight": state.head_weight, "head_bias": state.head_bias}))


def test_majority_vote_downlink_is_one_bit(exp) -> None:
    method = create_method(tiny_config(method="signsgd", signsgd_mode="vote"), exp.net)
    from deltamask.codecs.quant import SignCodec
    from deltamask.methods import Reply

    p = method.p
    rng = np.random.default_rng(0)
    us = [rng.normal(size=p).astype(np.float32) for _ in range(3)]
    replies = [Reply(i, SignCodec().encode(u, scale=float(np.abs(u).mean())), 10) for i, u in enumerate(us)]
    g = method.server_update([method.decompress(r.payload) for r in replies], [1.0] * 3, replies, 2)
    majority = np.sign(np.sign(us[0]) + np.sign(us[1]) + np.sign(us[2]))
    assert np.array_equal(np.sign(g), majority)
    assert np.abs(g).max() == pytest.approx(np.mean([np.abs(u).mean() for u in us]), rel=1e-5)
    payload = method.encode_update(g, 2)
    assert len(payload) == wire_bytes("sign1", p)
    np.testing.assert_allclose(method.decode_update(payload), g, rtol=1e-6)


@pytest.mark.parametrize("name", ["topk", "signsgd"])
def test_error_feedback_loses_nothing(exp, name: str) -> None:
    """sum of what was sent + the final error == sum of the local updates (Stich et al. 2018)."""
    method = create_method(tiny_config(method=name, topk_ratio=0.02), exp.net)
    ctx = ClientContext(2, 0, 0, {})
    rng = np.random.default_rng(1)
    total_u = np.zeros(method.p)
    total_sent = np.zeros(method.p)
    for rnd in range(2, 6):
        ctx.round = rnd
        u = rng.normal(size=method.p).astype(np.float32)
        payload, _ = method.compress(u, ctx)
        total_u += u
        total_sent += method.decompress(payload)
    np.testing.assert_allclose(total_sent + ctx.state["ef_error"], total_u, atol=1e-3)


def test_lora_layout_and_delta(exp) -> None:
    method = create_method(tiny_config(method="lora", lora_rank=2), exp.net)
    net = exp.net
    adapted = {i for i, *_ in method.layout}
    for i, shape in enumerate(net.shapes):
        if len(shape) == 4 and shape[1] == 1:
            assert i not in adapted  # depthwise kernels stay frozen
    assert 0 < method.p < net.num_masked
    v0 = method.initial_vector()
    assert torch.count_nonzero(method.to_delta(torch.from_numpy(v0))) == 0  # B = 0 at init
    v = v0.copy()
    i, out, inn, off = method.layout[0]
    v[off : off + out * 2] = 1.0
    d = method.to_delta(torch.from_numpy(v))
    lo = net.offsets[i]
    assert torch.count_nonzero(d[lo : lo + out * inn]) > 0
    assert torch.count_nonzero(d) == torch.count_nonzero(d[lo : lo + out * inn])
    f16 = create_method(tiny_config(method="lora", lora_rank=2, lora_dtype="f16"), exp.net)
    assert len(f16.compress(v, ClientContext(2, 0, 0, {}))[0]) == 40 + 9 + 2 * method.p


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"method": "eden", "eden_bits": 1.5}, "eden_bits"),
        ({"method": "drive", "rotation_block": 1000}, "rotation_block"),
        ({"method": "qsgd", "qsgd_levels": 0}, "qsgd_levels"),
        ({"method": "lora", "lora_rank": 10_000}, "lora_rank"),
        ({"method": "topk", "topk_ratio": 1.5}, "topk_ratio"),
        ({"method": "fedavg", "weight_lr": 0.0}, "weight_lr"),
    ],
)
def test_bad_baseline_config_names_the_key(exp, kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        create_method(tiny_config(**kw), exp.net)


def test_resume_equals_uninterrupted_with_error_feedback(tmp_path) -> None:
    cfg = tiny_config(method="topk", rounds=3, weight_lr=1e-3)
    run_local(cfg, tmp_path / "full")
    run_local(cfg, tmp_path / "cut", stop_after=2)
    run_local(cfg, tmp_path / "cut", resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))

"""Issue 21: every attack of the catalogue (deltamask.testing.faults.ATTACKS) on a tiny local run. The run completes
(or fails loudly), the attacker is recorded with the right kind and reason, and the model stays finite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dmtest import model_is_finite, tiny_config

from deltamask.codecs import codec_of, get_codec
from deltamask.engines.local import run_local
from deltamask.errors import RunFailed
from deltamask.testing.faults import Attack
from deltamask.codecs.bundle import join_bundle, split_bundle

BAD = 1  # the malicious client


def cfg4(**kw: object):  # noqa: ANN201
    return tiny_config(num_clients=4, clients_per_round=4, min_partition_size=20, **kw)


def run(cfg, tmp: Path, fault) -> tuple[dict, list[dict]]:  # noqa: ANN001
    s = run_local(cfg, tmp, fault=fault)
    return s, [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]


def failures_of(recs: list[dict], client: int) -> list[dict]:
    return [f | {"round": r["round"]} for r in recs for f in r["failures"] if f["client"] == client]


def attack(kind: str):  # noqa: ANN201
    return lambda rnd, cid: Attack(kind) if cid == BAD else None


@pytest.mark.parametrize(
    "kind, rounds, reason",
    [
        ("all-flips", [2, 3], "over the cap"),
        ("random-cap", [2, 3], "the round's median"),
        ("nan-head", [1], "non-finite"),
        ("huge-bias", [1], "beyond max_abs_param"),
        ("forged-samples", [1, 2, 3], "num_samples 1000000000 claimed"),
        ("forged-metrics", [1, 2, 3], "not a finite number"),
    ],
)
def test_attack_is_rejected_with_its_reason(tmp_path: Path, kind: str, rounds: list[int], reason: str) -> None:
    s, recs = run(cfg4(), tmp_path, attack(kind))
    assert s["status"] == "completed" and model_is_finite(tmp_path)
    fails = failures_of(recs, BAD)
    assert [f["round"] for f in fails] == rounds, fails
    assert all(f["kind"] == "rejected" and reason in f["reason"] for f in fails), fails
    assert all(not failures_of(recs, c) for c in (0, 2, 3))  # no honest client is cut


def test_nan_head_without_the_check_would_have_poisoned_the_model(tmp_path: Path) -> None:
    """The reference for the test above: the same NaN head averaged in gives a NaN head (what happened before
    issue 21); the run now rejects that reply instead."""
    from deltamask.fl.aggregation import fedavg

    w = np.ones((2, 3), np.float32)
    bad = w.copy()
    bad[0, 0] = np.nan
    assert np.isnan(fedavg([w, bad], [1.0, 1.0])).any()


@pytest.mark.parametrize("kind", ["anti-update", "label-flip", "targeted-bias"])
def test_attacks_within_the_bounds_complete_with_a_finite_model(tmp_path: Path, kind: str) -> None:
    s, recs = run(cfg4(), tmp_path, attack(kind))
    assert s["status"] == "completed" and model_is_finite(tmp_path)
    assert all(np.isfinite(r["accuracy"]) for r in recs)


def test_forged_samples_cannot_take_over_a_weighted_aggregation(tmp_path: Path) -> None:
    """weighted=true: the server weighs by its own partition sizes, and a client claiming 10^9 is refused."""
    cfg = cfg4(weighted=True)
    s, recs = run(cfg, tmp_path / "a", attack("forged-samples"))
    assert {f["round"] for f in failures_of(recs, BAD)} == {1, 2, 3}
    # the honest clients' run without the attacker's reply at all gives the same model
    def drop(rnd: int, cid: int):  # noqa: ANN202
        if cid == BAD:
            raise RuntimeError("offline")
        return None

    s2, recs2 = run(cfg, tmp_path / "b", drop)
    assert [r["accuracy"] for r in recs] == [r["accuracy"] for r in recs2]


def _indices_reply(count_of):  # noqa: ANN001, ANN202
    """A fault whose reply, in mask rounds, is an exact index set of ``count_of(n)`` indices."""

    def forge(payload: bytes) -> bytes:
        parts = split_bundle(payload)
        last = parts[-1]
        c = codec_of(last)
        if c.kind != "indices":
            return payload
        from deltamask.codecs.container import unpack

        n = unpack(last).n
        idx = np.arange(count_of(n), dtype=np.int64)
        return join_bundle([*parts[:-1], get_codec("ans").encode(idx, n)])

    return lambda rnd, cid: forge if cid == BAD else None


@pytest.mark.parametrize("over", [0, 1])
@pytest.mark.parametrize("fraction, cap_of", [(0.01, lambda n: int(np.floor(0.01 * n))), (0.0, lambda n: int(np.ceil(0.1 * n)))])
def test_the_flip_cap_at_its_edge_through_a_run(tmp_path: Path, over: int, fraction: float, cap_of) -> None:  # noqa: ANN001
    """A reply with exactly the cap's flips is accepted, one more is rejected: floor(max_flip_fraction * N), or
    by default (0) the protocol's own bound ceil(kappa * N) (kappa = 0.1)."""
    cfg = cfg4(max_flip_fraction=fraction, flip_outlier=0.0, kappa=0.1)
    s, recs = run(cfg, tmp_path, _indices_reply(lambda n: cap_of(n) + over))
    fails = failures_of(recs, BAD)
    if over:
        assert [f["round"] for f in fails] == [2, 3] and all("over the cap" in f["reason"] for f in fails)
    else:
        assert fails == []
        flips = [c["flips"] for r in recs if r["phase"] == "mask" for c in r["clients"] if c["client"] == BAD]
        assert flips and all(f == cap_of(s["num_masked_params"]) for f in flips)


def _head_bias(value: float):  # noqa: ANN202
    def forge_for(method):  # noqa: ANN001, ANN202
        def forge(payload: bytes) -> bytes:
            parts = split_bundle(payload)
            if codec_of(parts[-1]).kind != "array":
                return payload
            w, b = method.decode_head(parts[-1])
            b = b.copy()
            b[0] = value
            return join_bundle([*parts[:-1], method.encode_head(w, b)])

        return forge

    return forge_for


def test_a_large_head_update_is_clipped_and_recorded(tmp_path: Path) -> None:
    from deltamask.run.experiment import build_experiment

    cfg = cfg4()
    exp = build_experiment(cfg)
    forge = _head_bias(5000.0)(exp.method)
    s = run_local(cfg, tmp_path, fault=lambda rnd, cid: forge if cid == BAD else None, experiment=exp)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    c1 = {c["client"]: c for c in recs[0]["clients"]}
    assert "clipped" in c1[BAD] and "clip_reason" in c1[BAD]
    assert all("clipped" not in c1[c] for c in (0, 2, 3))
    med = float(np.median([c["bias_norm"] for c in c1.values()]))  # the bias is clipped against the other biases
    assert c1[BAD]["bias_norm"] * c1[BAD]["clipped"] == pytest.approx(cfg.clip_factor * med, rel=1e-6)
    assert "bias update norm" in c1[BAD]["clip_reason"] and "weight" not in c1[BAD]["clip_reason"]
    from safetensors.numpy import load_file

    bias = load_file(str(tmp_path / "model.safetensors"))
    b = [v for k, v in bias.items() if k.endswith("bias") and "head" in k][0]
    assert abs(float(b[0])) < cfg.clip_factor * med  # without clipping bias[0] would be about 5000 / 4
    assert s["status"] == "completed"


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_resist_a_large_head_bias(tmp_path: Path, rule: str) -> None:
    from deltamask.run.experiment import build_experiment

    cfg = cfg4(robust_mean=rule, clip_factor=0.0)
    exp = build_experiment(cfg)
    forge = _head_bias(5000.0)(exp.method)
    run_local(cfg, tmp_path, fault=lambda rnd, cid: forge if cid == BAD else None, experiment=exp)
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "model.safetensors"))
    b = [v for k, v in arrays.items() if k.endswith("bias") and "head" in k][0]
    assert abs(float(b[0])) < 10.0


def test_honest_runs_are_bit_identical_with_and_without_the_defenses(tmp_path: Path) -> None:
    """Where nothing is clipped or rejected, the defaults give exactly the result of no defenses at all."""
    off = dict(max_flip_fraction=1.0, flip_outlier=0.0, clip_factor=0.0, max_abs_param=3e38)
    _, a = run(cfg4(), tmp_path / "on", None)
    _, b = run(cfg4(**off), tmp_path / "off", None)
    keys = ("accuracy", "loss", "sampled_accuracy", "uplink_bits", "downlink_bits", "mask_density")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert all(not r["failures"] for r in a)
    assert all("clipped" not in c for r in a for c in r.get("clients", []))


def test_an_exception_while_processing_one_reply_rejects_only_that_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltamask.methods.masks import DeltaMask

    real = DeltaMask.decode_update
    calls = {"n": 0}

    def flaky(self, payload, theta_g):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise ZeroDivisionError("boom")
        return real(self, payload, theta_g)

    monkeypatch.setattr(DeltaMask, "decode_update", flaky)
    s, recs = run(cfg4(), tmp_path, None)
    fails = [f for r in recs for f in r["failures"]]
    assert s["status"] == "completed" and len(fails) == 1
    assert fails[0]["kind"] == "rejected" and "ZeroDivisionError: boom" in fails[0]["reason"]


def test_a_non_finite_server_state_fails_the_run_and_writes_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltamask.methods.masks import MaskMethod

    real = MaskMethod.aggregate

    def poisoned(self, state, replies, round_):  # noqa: ANN001, ANN202
        agg = real(self, state, replies, round_)
        if round_ == 2:
            state.theta = state.theta.copy()
            state.theta[3] = np.nan
        return agg

    monkeypatch.setattr(MaskMethod, "aggregate", poisoned)
    with pytest.raises(RunFailed, match="non-finite values in the server state \\(theta\\)"):
        run_local(cfg4(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["failure"]
    assert not (tmp_path / "model.safetensors").exists()


def test_fedavg_scaled_update_is_clipped(tmp_path: Path) -> None:
    cfg = cfg4(method="fedavg", rounds=3, head_warmup_rounds=1)
    s, recs = run(cfg, tmp_path, attack("scaled-update"))
    assert s["status"] == "completed" and model_is_finite(tmp_path)
    for r in recs[1:]:
        c = {x["client"]: x for x in r["clients"]}
        assert "clipped" in c[BAD] and all("clipped" not in c[i] for i in (0, 2, 3))


def _golomb_overflow(payload: bytes) -> bytes:
    """An exact index set whose Rice parameter 62 makes the second gap overflow int64 (found in review):
    it once decoded to [0, -9223372036854775807] and crashed the aggregation."""
    from deltamask.codecs.container import pack, unpack
    from deltamask.codecs.exact import _GOLOMB_PARAMS, GolombRiceCodec

    parts = split_bundle(payload)
    if codec_of(parts[-1]).kind != "indices":
        return payload
    n = unpack(parts[-1]).n
    unary = np.packbits(np.array([1, 0, 0, 1], np.uint8), bitorder="little").tobytes()
    return join_bundle([*parts[:-1], pack(GolombRiceCodec.codec_id, n, 2, unary + bytes(16), _GOLOMB_PARAMS.pack(62, 4))])


def test_an_overflowing_index_set_is_dropped_not_a_crash(tmp_path: Path) -> None:
    from deltamask.codecs import CodecError

    forged = _golomb_overflow(get_codec("golomb").encode(np.arange(3, dtype=np.int64), 1000))
    with pytest.raises(CodecError, match="not increasing"):
        codec_of(forged).decode(forged, expect_n=1000)
    s, recs = run(cfg4(), tmp_path, lambda rnd, cid: _golomb_overflow if cid == BAD else None)
    fails = failures_of(recs, BAD)
    assert s["status"] == "completed" and [f["round"] for f in fails] == [2, 3]
    assert all(f["kind"] == "malformed" and "not increasing" in f["reason"] for f in fails)


def test_signsgd_vote_refuses_coordinate_rules_and_negative_scales(tmp_path: Path) -> None:
    from deltamask.config import ConfigError
    from deltamask.run.experiment import build_experiment

    with pytest.raises(ConfigError, match="robust_mean"):
        build_experiment(cfg4(method="signsgd", signsgd_mode="vote", robust_mean="median"))

    def negative(payload: bytes) -> bytes:
        codec = codec_of(payload)
        signs, scale = codec.decode_signs(payload)
        return codec.encode(signs.astype(np.float32), scale=-1e4)

    s, recs = run(cfg4(method="signsgd", signsgd_mode="vote"), tmp_path, lambda rnd, cid: negative if cid == BAD and rnd > 1 else None)
    fails = failures_of(recs, BAD)
    assert s["status"] == "completed" and [f["round"] for f in fails] == [2, 3]
    assert all(f["kind"] == "rejected" and "scale" in f["reason"] for f in fails)


def test_a_reply_for_an_empty_partition_is_rejected() -> None:
    from types import SimpleNamespace

    from deltamask.methods import Reply
    from deltamask.run.round import screen_replies

    exp = SimpleNamespace(client_sizes=[5, 0], method=SimpleNamespace(max_reply_bytes=lambda: 100))
    good, bad = screen_replies(exp, [Reply(0, b"", 5, {}), Reply(1, b"", 0, {}), Reply(2, b"", 1, {}), Reply(0, b"", 5, {"x": 10**400})])
    assert [r.client_id for r in good] == [0]
    assert [(f.client, f.kind) for f in bad] == [(1, "rejected"), (2, "rejected"), (0, "rejected")]
    assert "empty" in bad[0].reason and "outside" in bad[1].reason


def test_the_reply_size_cap_at_its_edge_in_the_driver() -> None:
    """Issue 22: a reply's payload may hold at most the method's max_reply_bytes(); one byte more is rejected."""
    from types import SimpleNamespace

    from deltamask.methods import Reply
    from deltamask.run.round import screen_replies

    exp = SimpleNamespace(client_sizes=[5, 5], method=SimpleNamespace(max_reply_bytes=lambda: 100))
    good, bad = screen_replies(exp, [Reply(0, bytes(100), 5, {}), Reply(1, bytes(101), 5, {})])
    assert [r.client_id for r in good] == [0]
    assert [(f.client, f.kind) for f in bad] == [(1, "rejected")] and "payload of 101 bytes, over the cap of 100" in bad[0].reason


def test_every_builtin_uplink_codec_fits_the_reply_cap_at_its_worst() -> None:
    """The cap (64 bits per masked scalar and head parameter, plus framing) leaves every built-in codec's
    worst case inside it: an index codec naming all N positions, a mask codec against adverse probabilities,
    an array codec on random floats."""
    from deltamask.codecs import available_codecs
    from deltamask.methods.base import REPLY_OVERHEAD_BYTES

    n = 20_000
    rng = np.random.default_rng(0)
    sizes = {name: len(get_codec(name).encode(np.arange(n, dtype=np.int64), n)) for name in available_codecs("indices")}
    sizes.update({name: len(get_codec(name).encode(rng.random(n) < 0.5, np.full(n, 1e-6))) for name in available_codecs("mask")})
    sizes.update({name: len(get_codec(name).encode(rng.normal(size=n).astype(np.float32))) for name in available_codecs("array") if name != "i64"})
    assert len(sizes) >= 15
    for name, size in sizes.items():
        assert size <= 8 * n + REPLY_OVERHEAD_BYTES, (name, size / n)
    assert max(sizes.values()) > 2 * n  # the cap is not vacuous: fuse16 and f32 take more than 2 bytes per scalar


@pytest.mark.parametrize("codec", ["fuse8", "fuse8-4w", "ans"])
def test_an_honest_reply_at_the_kappa_bound_is_accepted_whatever_the_codec(codec: str) -> None:
    """The most an honest client sends is ceil(kappa * N) keys; a filter's members add its false positives
    (2^-8 of the other weights), which the default cap allows for."""
    from deltamask.run.experiment import build_experiment
    from deltamask.methods import Reply

    cfg = cfg4(codec=codec, kappa=0.005, flip_outlier=0.0)
    exp = build_experiment(cfg, test=False)
    method = exp.method
    state = method.init_state()
    rnd = cfg.head_warmup_rounds + 1
    n, keys = method.n, int(np.ceil(0.005 * method.n))
    rng = np.random.default_rng(0)
    replies = []
    for cid in range(3):
        idx = np.sort(rng.choice(n, size=keys, replace=False)).astype(np.int64)
        replies.append(Reply(cid, method.index_codec.encode(idx, n, seed=cid), 50))
    agg = method.aggregate(state, replies, rnd)
    assert not agg.dropped and agg.num_good == 3
    if codec.startswith("fuse"):
        assert max(c["flips"] for c in agg.clients) > keys  # false positives on top of the keys


@pytest.mark.parametrize("train_head", [False, True])
def test_a_label_flipper_is_the_odd_one_out_in_the_reported_cohort_cosine(tmp_path: Path, train_head: bool) -> None:
    """Label flipping is honest in form (no bound sees it), but every round with heads reports each client's
    ``cohort_cos``, its head update's agreement with the round's median update: the flipper's is the lowest,
    so an operator finds it in metrics.jsonl without a root set (in mask rounds as ``head_cohort_cos``)."""
    s, recs = run(cfg4(head_warmup_rounds=2, train_head=train_head), tmp_path, attack("label-flip"))
    assert s["status"] == "completed"
    key = {"head": "cohort_cos", "mask": "head_cohort_cos"}
    rounds = [r for r in recs if r["phase"] == "head" or train_head]
    assert len(rounds) == (3 if train_head else 2)
    for r in rounds:
        cos = {c["client"]: c[key[r["phase"]]] for c in r["clients"]}
        assert sorted(cos) == [0, 1, 2, 3]
        assert cos[BAD] < min(cos[c] for c in (0, 2, 3)), (r["round"], cos)

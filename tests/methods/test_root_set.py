"""Issue 21: the server's root set (``root_samples``; FLTrust). The server holds a few labelled training images
that no client holds, trains the head on them each round from the same start, and weighs each client's head
update by its cosine to the server's update (0 where it points away), scaled to the server update's norm: the
defense against clients that train honestly on flipped labels, whose updates have honest norms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from dmtest import model_is_finite, tiny_config

from deltamask.config import ConfigError, build_config
from deltamask.data import DataError, ImageDataset, server_root, subsample
from deltamask.data.sources import _subsample_index
from deltamask.engines.local import run_local
from deltamask.fl.robust import trust_combine
from deltamask.run.metrics import read_jsonl
from deltamask.testing.faults import Attack

BAD = 1


# --- the rule, against a slow reference -------------------------------------------------------------------
def _reference(base, items, root, weights):  # noqa: ANN001, ANN202
    """FLTrust written out with Python floats, one coordinate at a time."""
    b = [float(x) for x in base]
    g0 = [float(r) - x for r, x in zip(root, b)]
    n0 = math.sqrt(math.fsum(v * v for v in g0))
    num = [0.0] * len(b)
    den = 0.0
    cosines = []
    for it, w in zip(items, weights):
        g = [float(v) - x for v, x in zip(it, b)]
        n = math.sqrt(math.fsum(v * v for v in g))
        cos = math.fsum(u * v for u, v in zip(g, g0)) / (n * n0) if n and n0 else 0.0
        cosines.append(cos)
        t = max(0.0, cos)
        if t and w:
            for j in range(len(b)):
                num[j] += w * t * g[j] * n0 / n
            den += w * t
    value = None if den == 0 else [x + v / den for x, v in zip(b, num)]
    return value, cosines


def test_trust_combine_matches_a_slow_reference() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(size=40).astype(np.float32)
    root = base + rng.normal(size=40).astype(np.float32)
    items = [base + (root - base) * s + rng.normal(scale=0.5, size=40).astype(np.float32) for s in (1.0, 2.0, 0.3)]
    items.append(base - 3 * (root - base))  # points away: no trust
    items.append(base.copy())  # no update: no trust
    weights = [1.0, 2.0, 1.0, 5.0, 1.0]
    got = trust_combine(base, items, root, weights)
    want, cos = _reference(base, items, root, weights)
    np.testing.assert_allclose(got.value, np.asarray(want, np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.cosines, cos, rtol=1e-9, atol=1e-12)
    assert got.trust[3] == 0.0 and got.trust[4] == 0.0 and all(t > 0 for t in got.trust[:3])
    assert got.root_norm == pytest.approx(float(np.linalg.norm(root.astype(np.float64) - base)))
    # every trusted update is scaled to the server's norm: one client alone moves the vector by exactly |g0|
    one = trust_combine(base, [base + 10 * (root - base)], root)
    np.testing.assert_allclose(one.value, root, rtol=1e-5, atol=1e-6)


def test_trust_combine_keeps_the_base_when_no_client_earns_trust() -> None:
    base = np.zeros(4, np.float32)
    root = np.array([1, 0, 0, 0], np.float32)
    got = trust_combine(base, [np.array([-1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)], root)
    assert got.value is None and got.trust == [0.0, 0.0]
    assert trust_combine(base, [root], base.copy()).value is None  # a zero server update trusts nobody


# --- the root set's images -------------------------------------------------------------------------------
def _dataset(n: int = 200, classes: int = 4) -> ImageDataset:
    y = np.arange(n) % classes
    x = np.zeros((n, 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    return ImageDataset("toy", x, y, x[:20], y[:20], [str(c) for c in range(classes)])


def _ids(x: np.ndarray) -> set[int]:
    return {int(a) + 256 * int(b) for a, b in zip(x[:, 0, 0, 0], x[:, 0, 0, 1])}


def test_the_root_set_lies_outside_every_client_and_is_stratified_and_seeded() -> None:
    ds = _dataset()
    clients = subsample(ds, 120, None, seed=3)
    rx, ry = server_root(ds, 120, 40, seed=3)
    assert len(ry) == 40 and not _ids(rx) & _ids(clients.x_train)  # no client holds a root image
    assert np.bincount(ry).tolist() == [10, 10, 10, 10]  # class-proportional
    assert _ids(rx) <= set(range(200))
    rx2, _ = server_root(ds, 120, 40, seed=3)
    assert _ids(rx2) == _ids(rx)
    rx4, _ = server_root(ds, 120, 40, seed=4)
    assert _ids(rx4) != _ids(rx)
    tr, _ = _subsample_index(ds, 120, None, 3)
    assert _ids(clients.x_train) == set(tr.tolist())


def test_the_root_set_size_at_its_edge() -> None:
    ds = _dataset()
    rx, ry = server_root(ds, 120, 80, seed=0)  # exactly what train_samples leaves
    assert len(ry) == 80 and len(_ids(rx)) == 80
    with pytest.raises(DataError, match="root_samples=81 .* leaves 80.*at most 119"):
        server_root(ds, 120, 81, seed=0)
    with pytest.raises(DataError, match="train_samples=0 leaves 0"):
        server_root(ds, None, 1, seed=0)  # every image is a client's


def test_root_samples_config_errors() -> None:
    assert build_config({"root_samples": 100}).root_samples == 100
    with pytest.raises(ConfigError, match="root_samples.*>= 0"):
        build_config({"root_samples": -1})
    with pytest.raises(ConfigError, match="root_samples.*not to 'fedavg'"):
        build_config({"root_samples": 10, "method": "fedavg"})
    with pytest.raises(ConfigError, match="root_samples.*robust_mean='median'"):
        build_config({"root_samples": 10, "robust_mean": "median"})
    # a root set where no heads are ever combined would be silently unused: refused
    with pytest.raises(ConfigError, match="root_samples.*combines none.*head_warmup_rounds"):
        build_config({"root_samples": 10, "head_warmup_rounds": 0})
    assert build_config({"root_samples": 10, "head_warmup_rounds": 1}).root_samples == 10
    assert build_config({"root_samples": 10, "head_warmup_rounds": 0, "train_head": True}).train_head
    assert build_config({"root_samples": 10, "head_warmup_rounds": 0, "method": "linear-probe"}).root_samples == 10


# --- through runs -----------------------------------------------------------------------------------------
def cfg4(**kw: object):  # noqa: ANN201
    return tiny_config(num_clients=4, clients_per_round=4, min_partition_size=20, root_samples=60, **kw)


def _records(tmp: Path) -> list[dict]:
    return read_jsonl(tmp / "metrics.jsonl")


@pytest.mark.parametrize("method", ["deltamask", "linear-probe"])
def test_a_label_flipping_client_gets_no_trust_and_is_named(tmp_path: Path, method: str) -> None:
    cfg = cfg4(method=method, head_warmup_rounds=2 if method == "deltamask" else 0)
    s = run_local(cfg, tmp_path, fault=lambda rnd, cid: Attack("label-flip") if cid == BAD else None)
    assert s["status"] == "completed" and model_is_finite(tmp_path) and s["root_samples"] == 60
    heads = [r for r in _records(tmp_path) if r["phase"] == "head"]
    assert heads
    for r in heads:
        by = {c["client"]: c for c in r["clients"]}
        assert by[BAD]["trust"] == 0.0 and "distrusted" in by[BAD], by[BAD]
        assert "cosine" in by[BAD]["distrusted"] and "root_samples=60" in by[BAD]["distrusted"]
        assert all(by[c]["trust"] > 0 and "distrusted" not in by[c] for c in (0, 2, 3)), by
        assert by[BAD]["trust_cos"] < min(by[c]["trust_cos"] for c in (0, 2, 3))
        assert not r["failures"]  # a distrusted head is a valid reply, weighted 0: not a failure


def test_the_trust_rule_compares_heads_up_to_a_shift_common_to_every_class(tmp_path: Path) -> None:
    """Adding one vector to every class row of a head changes no prediction: a client whose update is the
    server's own plus such a shift is as trusted as the server's update itself (cosine 1)."""
    from deltamask.run.experiment import build_experiment

    exp = build_experiment(cfg4(rounds=1))
    m = exp.method
    state = m.init_state()
    w0, b0 = state.head_weight.copy(), state.head_bias.copy()
    rng = np.random.default_rng(0)
    dw, db = rng.normal(size=w0.shape).astype(np.float32), rng.normal(size=b0.shape).astype(np.float32)
    dw -= dw.mean(axis=0, keepdims=True)
    db -= db.mean()
    root = (w0 + dw, b0 + db)
    shift = rng.normal(size=(1, w0.shape[1])).astype(np.float32) * 50
    heads = [(w0 + dw + shift, b0 + db + 7.0), (w0 - dw, b0 - db)]
    recs = m.combine_heads(state, heads, [1.0, 1.0], [0, 1], root=root)
    assert recs[0]["trust_cos"] == pytest.approx(1.0, abs=1e-5) and recs[0]["trust"] > 0.99
    assert recs[1]["trust"] == 0.0 and "distrusted" in recs[1]
    np.testing.assert_allclose(state.head_weight, root[0], rtol=1e-4, atol=1e-5)  # one trusted client at the root's norm
    np.testing.assert_allclose(state.head_bias, root[1], rtol=1e-4, atol=1e-5)


def test_when_no_head_earns_trust_the_head_stays_and_the_round_is_skipped(tmp_path: Path) -> None:
    from deltamask.methods import Reply
    from deltamask.run.experiment import build_experiment

    exp = build_experiment(cfg4(rounds=1, method="linear-probe"))
    m = exp.method
    m.root = exp.root
    state = m.init_state()
    w0, b0 = state.head_weight.copy(), state.head_bias.copy()
    rw, rb = m.root_head(state, 1)
    away = [Reply(c, m.encode_head(w0 - (rw - w0) * (c + 1), b0 - (rb - b0) * (c + 1)), 1) for c in range(2)]
    v = state.head_version
    agg = m.aggregate(state, away, 1)
    assert agg.skipped and state.head_version == v
    np.testing.assert_array_equal(state.head_weight, w0)
    assert all(c["trust"] == 0.0 for c in agg.clients)


def test_a_resumed_run_with_a_root_set_ends_as_the_straight_one(tmp_path: Path) -> None:
    cfg = cfg4(rounds=4, head_warmup_rounds=2)
    fault = lambda rnd, cid: Attack("label-flip") if cid == BAD else None  # noqa: E731
    run_local(cfg, tmp_path / "a", fault=fault)
    run_local(cfg, tmp_path / "b", fault=fault, stop_after=1)
    run_local(cfg, tmp_path / "b", fault=fault, resume=True)
    keys = ("accuracy", "loss")
    assert [[r[k] for k in keys] for r in _records(tmp_path / "a")] == [[r[k] for k in keys] for r in _records(tmp_path / "b")]


def test_the_root_set_is_built_where_the_server_is_only() -> None:
    from deltamask.run.experiment import build_experiment

    cfg = cfg4(rounds=1)
    server = build_experiment(cfg, clients=[])  # what the Flower ServerApp builds
    assert server.root is not None and server.root.num_samples == 60 and server.describe()["root_samples"] == 60
    client = build_experiment(cfg, clients=[0], test=False)  # what a Flower client builds
    assert client.root is None


def test_a_config_asking_for_a_root_set_the_experiment_lacks_is_refused(tmp_path: Path) -> None:
    from deltamask.run.experiment import build_experiment

    exp = build_experiment(tiny_config(rounds=1))
    exp.cfg = tiny_config(rounds=1, root_samples=60)  # an experiment reused under another config (the benchmark does)
    with pytest.raises(ConfigError, match="root_samples.*60 asked for.*root set of 0"):
        run_local(exp.cfg, tmp_path, experiment=exp)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_jointly_trained_head_is_weighed_in_the_mask_rounds_too(tmp_path: Path) -> None:
    cfg = cfg4(rounds=3, head_warmup_rounds=1, train_head=True)
    s = run_local(cfg, tmp_path, fault=lambda rnd, cid: Attack("label-flip") if cid == BAD else None)
    assert s["status"] == "completed" and model_is_finite(tmp_path)
    masks = [r for r in _records(tmp_path) if r["phase"] == "mask"]
    assert len(masks) == 2
    for r in masks:
        by = {c["client"]: c for c in r["clients"]}
        assert set(by) == {0, 1, 2, 3} and all({"head_trust", "head_trust_cos", "head_root_norm"} <= set(c) for c in by.values())
        assert all(("head_distrusted" in c) == (c["head_trust"] == 0.0) for c in by.values())
        assert "flips" in by[BAD]  # its mask vote still counts: only the head is weighed

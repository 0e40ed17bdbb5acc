"""Issue 9: theta coded against the client's cached version (snapshot / cond / replay / same), the
digest check with its same-round snapshot fallback, the KL floor, and the schedules end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dmtest import tiny_config

from deltamask.codecs import CodecError, get_codec
from deltamask.codecs.delta import (
    conditional_entropy_bits,
    marginal_entropy_bits,
    theta_digest,
)
from deltamask.engines.local import LocalTransport, run_local
from deltamask.run.experiment import build_experiment
from deltamask.methods.downlink import StaleCache, kl_floor_bits
from deltamask.run.metrics import TIMING_KEYS, read_jsonl
from deltamask.run.round import run_rounds

MODES = ("snapshot", "cond", "replay", "auto")


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS and not k.startswith("downlink")}


class Watch(LocalTransport):
    """The local transport, checking after every exchange that each client that replied trained from
    exactly the server's theta, and noting how stale its cache was and which mode it got."""

    def __init__(self, exp, fault=None) -> None:
        super().__init__(exp, fault)
        self.seen: list[tuple[int, int, str]] = []  # (round, staleness, mode)
        self.held: list[int | None] = []  # the version each of those clients held
        self.expected: dict[int, np.ndarray] = {}
        real = exp.method.send

        def send(state, cid, rnd):
            held = state.client_theta_version.get(cid)
            out = real(state, cid, rnd)
            st = exp.method.sync.stats[cid]
            self.seen.append((rnd, -1 if held is None else state.theta_version - held, st["mode"]))
            self.held.append(held)
            self.expected[cid] = state.theta.copy()
            return out

        exp.method.send = send

    def exchange(self, round_, downlinks):
        ex = super().exchange(round_, downlinks)
        for cid in ex.replies:
            np.testing.assert_array_equal(self.states[cid]["theta"], self.expected[cid])
        return ex


def _run(tmp_path, name: str, fault=None, **over):
    cfg = tiny_config(**{"rounds": 9, "num_clients": 5, "clients_per_round": 2, **over})
    exp = build_experiment(cfg)
    t = Watch(exp, fault)
    s = run_rounds(exp, t, tmp_path / name)
    return s, t, read_jsonl(tmp_path / name / "metrics.jsonl")


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory) -> list[dict]:
    return _run(tmp_path_factory.mktemp("ref"), "ref", downlink="snapshot")[2]


@pytest.mark.parametrize("mode", MODES)
def test_every_downlink_mode_rebuilds_the_servers_theta_for_any_staleness(tmp_path, mode: str, snapshot_run) -> None:
    _, t, recs = _run(tmp_path, mode, downlink=mode)
    ref = snapshot_run
    assert [comparable(r) for r in recs] == [comparable(r) for r in ref]  # same training, only the bytes differ
    stale = {k for _, k, m in t.seen if k >= 0}
    assert {0, 1} <= stale and max(stale) >= 4 and len(stale) >= 4, t.seen  # current, and 1..R rounds behind
    if mode in ("cond", "replay"):
        # every client holding a version of counts (>= 1; version 0 is theta0's q8 levels) gets that mode
        got = [m for (_, k, m), v in zip(t.seen, t.held) if k > 0 and v]
        assert got and all(m == mode for m in got), t.seen
    assert [m for _, k, m in t.seen if k == -1] == ["snapshot"] * sum(k == -1 for _, k, m in t.seen)
    assert all(m == "same" for _, k, m in t.seen if k == 0)
    bits = [r["downlink_bits"] for r in recs]
    if mode == "auto":  # never more than the snapshot-only downlink, and less once clients hold something
        assert all(r["downlink_theta_bpp"] <= r["downlink_snapshot_bpp"] + 1e-12 or r["downlink_modes"].get("same") for r in recs)
        assert sum(bits) < sum(r["downlink_bits"] for r in ref)


def test_snapshot_mode_is_the_old_downlink_plus_a_digest(tmp_path) -> None:
    """A current client gets 'same' (the old downlink sent nothing): 40 container bytes + 34 params."""
    _, t, recs = _run(tmp_path, "s", downlink="snapshot")
    same = get_codec("theta-delta").encode_same(10, b"\0" * 16)
    assert len(same) == 40 + 34
    assert any(m == "same" for _, _, m in t.seen)


def test_a_damaged_cache_is_caught_and_resent_a_snapshot_in_the_same_round(tmp_path, caplog) -> None:
    """A client whose cached theta changed behind the server's back raises StaleCache; the driver re-sends
    it a snapshot in the same round, so the run ends exactly as an undamaged one (both sends counted)."""
    holder: dict = {}

    def fault(rnd, cid):
        st = holder["t"].states.get(cid)
        if rnd in (5, 7) and st is not None and "theta" in st:
            th = st["theta"].copy()
            th[0] = 0.5 if th[0] != 0.5 else 0.25
            st["theta"] = th

    cfg = tiny_config(rounds=9, num_clients=5, clients_per_round=2, downlink="auto")
    exp = build_experiment(cfg)
    holder["t"] = t = Watch(exp, fault)
    run_rounds(exp, t, tmp_path / "hurt")
    _, _, ref = _run(tmp_path, "ref", downlink="auto")
    hurt = read_jsonl(tmp_path / "hurt" / "metrics.jsonl")
    assert [comparable(r) | {"stale_resent": None} for r in hurt] == [comparable(r) | {"stale_resent": None} for r in ref]
    resent = [r for r in hurt if r.get("stale_resent")]
    assert resent and all(r["failures"] == [] for r in resent)
    for r in resent:  # the second send is counted
        twin = ref[r["round"] - 1]
        assert r["downlink_bits"] > twin["downlink_bits"]
    assert "stale theta cache" in caplog.text


def test_client_refuses_a_message_for_another_version_or_a_wrong_result(tmp_path) -> None:
    exp = build_experiment(tiny_config(rounds=4))
    m = exp.method
    state = m.init_state()
    cache: dict = {}
    snap = m.sync.theta_part(state, 0, 1)
    assert m.sync.client_apply(snap, cache) and theta_digest(cache["theta"]) == theta_digest(state.theta)
    codec = get_codec("theta-delta")
    assert not m.sync.client_apply(codec.encode_same(m.n, theta_digest(state.theta)), cache)
    with pytest.raises(StaleCache, match="holds"):
        m.sync.client_apply(codec.encode_same(m.n, b"x" * 16), cache)
    with pytest.raises(StaleCache, match="holds none"):
        m.sync.client_apply(codec.encode_same(m.n, theta_digest(state.theta)), {})
    # a cond message whose promised result is not what the levels give
    lv = cache["theta_levels"]
    bad = codec.encode_cond(lv, lv, "q8", 255, 255, "mode", 0.01, (1.0, 1.0), theta_digest(state.theta), b"y" * 16)
    with pytest.raises(StaleCache, match="rebuilt theta"):
        m.sync.client_apply(bad, cache)


@pytest.mark.parametrize("kind", ["counts", "q8"])
def test_cond_code_round_trips_and_approaches_the_conditional_entropy(kind: str) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    codec = get_codec("theta-delta")
    if kind == "counts":
        old = rng.binomial(5, 0.97, n)
        flip = rng.random(n) < 0.03
        new = np.where(flip, rng.binomial(7, 0.5, n), np.minimum(old + (old == 5) * 2, 7))
        tt, tv = 7, 5
    else:
        old = rng.integers(0, 256, n)
        new = np.clip(old + rng.choice([-1, 0, 0, 0, 0, 1], n), 0, 255)
        tt = tv = 255
    data = codec.encode_cond(new, old, kind, tt, tv, "mode", 0.01, (1.0, 1.0), b"a" * 16, b"b" * 16)
    msg = codec.decode(data, expect_n=n)
    np.testing.assert_array_equal(codec.cond_levels(msg, old, tv), new)
    h = conditional_entropy_bits(kind, new, old, tt + 1, tv + 1)
    # an independent count of H(new | context): the joint histogram by a Python loop over pairs
    ctx = old if kind == "counts" else old >> 3
    sym = new if kind == "counts" else (new - old) % 256
    pairs: dict = {}
    for c, s in zip(ctx.tolist(), sym.tolist()):
        pairs[(c, s)] = pairs.get((c, s), 0) + 1
    rows: dict = {}
    for (c, _), k in pairs.items():
        rows[c] = rows.get(c, 0) + k
    ref = -sum(k * math.log2(k / rows[c]) for (c, _), k in pairs.items())
    assert h == pytest.approx(ref, rel=1e-9)
    assert 8 * len(data) <= h * 1.02 + 8 * 2000  # ANS within 2% plus the params
    assert h < marginal_entropy_bits(new, tt + 1 if kind == "counts" else 256)
    with pytest.raises(CodecError):
        codec.cond_levels(msg, old[:-1], tv)
    with pytest.raises(CodecError):
        codec.cond_levels(msg, np.roll(old, 1) if kind == "counts" else old, tv - 1 if kind == "counts" else 254)


def test_kl_floor_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.001, 0.999, 3001).astype(np.float32)
    q = np.clip(p + rng.normal(0, 0.05, p.size), 0.01, 0.99).astype(np.float32)
    ref = sum(float(a) * math.log2(float(a) / float(b)) + (1 - float(a)) * math.log2((1 - float(a)) / (1 - float(b)))
              for a, b in zip(p, q))
    assert kl_floor_bits(p, q, chunk=1000) == pytest.approx(ref, rel=1e-9)
    assert kl_floor_bits(q, q) == pytest.approx(0.0, abs=1e-9)


def test_the_kl_floor_is_recorded_beside_the_bound(tmp_path) -> None:
    run_local(tiny_config(rounds=3), tmp_path)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    mask = [r for r in recs if r["phase"] == "mask"]
    for r in mask:
        kl = [c["kl_floor_bits"] for c in r["clients"]]
        assert r["uplink_kl_floor_bpp"] == pytest.approx(np.mean(kl) / (r["uplink_bits"] / r["num_replies"] / r["uplink_bpp"]))
        assert 0 < r["uplink_kl_floor_bpp"] < r["uplink_bpp"]
        assert r["downlink_cond_entropy_bpp"] is not None


@pytest.mark.parametrize("mode", ["cond", "replay"])
def test_resume_ends_as_uninterrupted_for_every_mode(tmp_path, mode: str) -> None:
    """The downlink history lives in the run state and the client caches (levels, digest) in the local
    engine's: a run stopped after round 4 and resumed is the uninterrupted run, byte for byte."""
    from safetensors.numpy import load_file

    cfg = tiny_config(rounds=8, num_clients=5, clients_per_round=2, downlink=mode)
    run_local(cfg, tmp_path / "full")
    assert run_local(cfg, tmp_path / "cut", stop_after=4) == {"stopped_after": 4}
    run_local(cfg, tmp_path / "cut", resume=True)
    full = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    cut = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert full == cut
    assert any(r.get("downlink_modes", {}).get(mode) for r in cut[4:])  # the mode was used after the resume
    a, b = load_file(str(tmp_path / "full" / "state.safetensors")), load_file(str(tmp_path / "cut" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("extra/dl/") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_codec_cli_inspects_a_theta_delta_and_refuses_to_decode_it_alone(tmp_path, capsys) -> None:
    from deltamask.app.cli_codec import main

    p = tmp_path / "td.bin"
    rng = np.random.default_rng(2)
    old = rng.binomial(5, 0.9, 500)
    p.write_bytes(get_codec("theta-delta").encode_cond(old, old, "counts", 5, 5, "mode", 0.01, (1.0, 1.0), b"a" * 16, b"b" * 16))
    assert main(["codec", "inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert '"mode": "cond"' in out and "61" * 16 in out  # base digest, hex of b"a"
    assert main(["codec", "decode", str(p), "-o", str(tmp_path / "x.npy")]) == 2
    assert "only that client can decode it" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_fedpm_replays_its_masks_too(tmp_path) -> None:
    """FedPM sends whole masks; a replay re-aggregates them on the client to the server's theta."""
    _, t, _ = _run(tmp_path, "fedpm", method="fedpm", downlink="replay", rounds=6)
    assert any(m == "replay" for _, _, m in t.seen)  # and Watch checked every client's theta


def test_downlink_history_bounds_what_the_server_keeps(tmp_path) -> None:
    """downlink_history=1: only the previous version is kept to code against; a client further behind gets a
    snapshot, and the state holds levels of at most two versions."""
    from safetensors.numpy import load_file

    _, t, _ = _run(tmp_path, "h1", downlink="auto", downlink_history=1)
    assert all(m == "snapshot" for (_, k, m), v in zip(t.seen, t.held) if k >= 2), t.seen
    assert any(m == "cond" for (_, k, m) in t.seen if k == 1)
    st = load_file(str(tmp_path / "h1" / "state.safetensors"))
    assert len([k for k in st if k.startswith("extra/dl/levels/")]) <= 2


@pytest.mark.parametrize("stale", [True, False])
def test_only_a_stale_cache_failure_gets_a_snapshot_not_a_reason_that_reads_like_one(tmp_path, stale) -> None:
    """The driver acts on the failure's kind, never on its text: a StaleCache is re-sent a snapshot in the
    same round, while any other client failure whose message merely reads like one (the old marker) is
    dropped as an error."""
    from deltamask.methods import ClientFailure

    raised: list[int] = []

    def fault(rnd, cid):  # noqa: ANN001, ANN202
        if rnd == 2 and not raised:
            raised.append(cid)
            raise StaleCache("the cache moved") if stale else ClientFailure("[stale theta cache] the cache moved")

    run_local(tiny_config(rounds=2, num_clients=3, clients_per_round=3), tmp_path, fault=fault)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    if stale:
        assert last["stale_resent"] == raised and last["failures"] == [] and last["num_aggregated"] == 3
    else:
        assert "stale_resent" not in last and [(f["client"], f["kind"]) for f in last["failures"]] == [(raised[0], "error")]


def test_the_downlink_history_is_typed_state_saved_under_the_state_files_names(tmp_path) -> None:
    """The server's theta history lives in ``state.theta_versions`` (ThetaVersion entries, no string keys in
    ``state.extra``) and is written under the state file's ``extra/dl/<what>/<version>`` names, so files
    written before it was typed resume, and it reads back to the same entries."""
    from safetensors.numpy import load_file

    from deltamask.fl.aggregation import ThetaVersion, theta_versions_from_arrays, theta_versions_to_arrays
    from deltamask.run.state import load_state

    run_local(tiny_config(rounds=4, num_clients=4, clients_per_round=2, downlink="auto"), tmp_path)
    state, _, _, _ = load_state(tmp_path)
    assert state.theta_versions and all(isinstance(tv, ThetaVersion) for tv in state.theta_versions.values())
    assert not [k for k in state.extra if k.startswith("dl/")]
    cur = state.theta_versions[state.theta_version]
    assert cur.digest == theta_digest(state.theta) and cur.levels is not None and cur.levels[0] == "counts"
    assert any(tv.replay is not None for tv in state.theta_versions.values())
    on_disk = {k[6:]: v for k, v in load_file(str(tmp_path / "state.safetensors")).items() if k.startswith("extra/dl/")}
    assert on_disk and set(on_disk) == set(theta_versions_to_arrays(state.theta_versions))
    back, rest = theta_versions_from_arrays(on_disk)
    assert not rest and theta_versions_to_arrays(back).keys() == on_disk.keys()
    for k, v in theta_versions_to_arrays(back).items():
        np.testing.assert_array_equal(v, on_disk[k], err_msg=k)


@pytest.mark.parametrize("method", ["deltamask", "fedpm", "linear-probe", "fedavg"])
def test_send_changes_no_server_state_and_returns_what_the_client_then_holds(tmp_path, method) -> None:
    """``Method.send`` is pure: the server state (what each client holds, the theta history) is the same after
    it, and the versions it returns are what the round driver records; ``downlink`` (send + record) gives
    the same bytes. Checked after a few rounds, for a current, a stale and a new client."""
    import copy

    from deltamask.methods.base import record_sent
    from deltamask.run.state import load_state

    cfg = tiny_config(method=method, rounds=4, num_clients=4, clients_per_round=2, head_warmup_rounds=1)
    run_local(cfg, tmp_path)
    state, _, _, _ = load_state(tmp_path)
    exp = build_experiment(cfg)
    m = exp.method
    for cid in (0, 1, 2, 3, 99):
        before = copy.deepcopy(state)
        sent = m.send(state, cid, 5)
        assert state.client_theta_version == before.client_theta_version
        assert state.client_head_version == before.client_head_version
        assert state.theta_versions.keys() == before.theta_versions.keys()
        assert sent.head_version == state.head_version
        assert sent.theta_version == (None if method == "linear-probe" else state.theta_version)
        again = copy.deepcopy(state)
        assert m.downlink(again, cid, 5) == sent.payload
        record_sent(state, cid, sent)
        assert state.client_theta_version == again.client_theta_version
        assert state.client_head_version == again.client_head_version


def test_a_state_without_its_theta_history_is_brought_up_to_date_on_resume_not_in_send(tmp_path) -> None:
    """A state written before the typed theta history (no versions): ``send`` refuses it rather than change it,
    ``Method.resumed`` (what the driver calls on resume) registers the current version, and the run resumes."""
    from deltamask.run.state import load_state, save_state

    cfg = tiny_config(rounds=4, num_clients=4, clients_per_round=2, downlink="auto")
    run_local(cfg, tmp_path, stop_after=3)
    state, clients, _, _ = load_state(tmp_path)
    state.theta_versions.clear()
    m = build_experiment(cfg).method
    with pytest.raises(RuntimeError, match="not registered"):
        m.send(state, 0, 4)
    m.resumed(state)
    assert list(state.theta_versions) == [state.theta_version]
    assert state.theta_versions[state.theta_version].digest == theta_digest(state.theta)
    state.theta_versions.clear()
    save_state(tmp_path, state, clients, cfg.to_dict())  # as an older build wrote it
    summary = run_local(cfg, tmp_path, resume=True)
    assert summary["status"] == "completed"

"""The real ServerApp and ClientApp code over an in-process loopback Grid (no Ray): parity with the
local engine, and faults. Fast enough for the default test run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("flwr")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from deltamask.engines.flower.client_app import ScriptedFault  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from deltamask.run.metrics import TIMING_KEYS, read_jsonl  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402

pytestmark = pytest.mark.flower


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS and not k.startswith("flower_")}


def assert_same_run(flower_dir, local_dir) -> None:  # noqa: ANN001
    from safetensors.numpy import load_file

    a, b = read_jsonl(flower_dir / "metrics.jsonl"), read_jsonl(local_dir / "metrics.jsonl")
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    sa, sb = load_file(str(flower_dir / "state.safetensors")), load_file(str(local_dir / "state.safetensors"))
    server_keys = [k for k in sb if k.startswith("server/")]
    assert server_keys and set(server_keys) == {k for k in sa if k.startswith("server/")}
    for k in server_keys:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (flower_dir, local_dir))
    skip = set(TIMING_KEYS) | {"setup_seconds", "engine"}
    assert {k: v for k, v in ja.items() if k not in skip} == {k: v for k, v in jb.items() if k not in skip}
    assert ja["engine"] == "flower"


def test_parity_with_local_engine(tmp_path) -> None:
    defaults = {**TINY, "rounds": 2, "out-dir": str(tmp_path / "flower")}
    run_server(LoopbackGrid(make_client_app(defaults), 3), {}, defaults)
    run_local(tiny_config(rounds=2), tmp_path / "local")
    assert_same_run(tmp_path / "flower", tmp_path / "local")
    for f in ("metrics.jsonl", "summary.json", "accuracy.png", "bpp.png", "model.safetensors", "config.json"):
        assert (tmp_path / "flower" / f).is_file(), f
    recs = read_jsonl(tmp_path / "flower" / "metrics.jsonl")
    for r in recs:  # Flower's own counts sit beside the codec bytes and include them
        assert r["flower_uplink_record_bytes"] >= r["uplink_bits"] // 8
        assert r["flower_downlink_message_bytes"] > r["flower_downlink_record_bytes"] >= r["downlink_bits"] // 8


def test_raising_malformed_and_silent_clients_are_dropped(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="deltamask")
    defaults = {**TINY, "rounds": 2, "clients-per-round": 3, "min-replies": 2, "out-dir": str(tmp_path), "node-wait-timeout": 0,
                "round-timeout": 2.0}
    fault = ScriptedFault(((1, 0, "raise"), (2, 1, "malformed")))
    grid = LoopbackGrid(make_client_app(defaults, fault=fault), 3, lose=[(2, 2)])
    summary = run_server(grid, {}, defaults)
    r1, r2 = read_jsonl(tmp_path / "metrics.jsonl")
    assert r1["failures"] == [{"client": 0, "reason": "RuntimeError: scripted fault: client 0 raises in round 1", "kind": "error", "node": 1000}]
    assert r1["num_aggregated"] == 2 and not r1["skipped_update"]
    reasons = {f["client"]: f["reason"] for f in r2["failures"]}
    assert set(reasons) == {1, 2}
    assert reasons[1].startswith("malformed payload") and "no reply within round-timeout" in reasons[2]
    # client 0 lost its cache in round 1; the server resent theta and head, so it trained fine
    assert r2["num_replies"] == 2 and r2["num_aggregated"] == 1
    assert r2["skipped_update"]  # 1 good reply < min_replies=2: the state is left alone
    from safetensors.numpy import load_file

    theta = load_file(str(tmp_path / "state.safetensors"))["server/theta"]
    from deltamask.codecs import get_codec

    q8 = get_codec("probs-q8")  # round 1 was a head round: theta is still theta0 as the clients decode it
    assert np.all(theta == q8.decode(q8.encode(np.full(1, tiny_config().theta0, np.float32)))[0])
    assert summary["rounds_completed"] == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "client 0 dropped: RuntimeError" in logged and "client 2 dropped: no reply" in logged


def test_forged_envelopes_through_the_flower_transport_are_rejected(tmp_path) -> None:
    """A node that claims 10^9 samples or sends NaN metrics is rejected by the round driver with its reason;
    the other nodes' round goes on and the model stays finite."""
    defaults = {**TINY, "rounds": 2, "clients-per-round": 3, "weighted": True, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    fault = ScriptedFault(((1, 0, "forged-samples"), (2, 1, "forged-metrics")))
    summary = run_server(LoopbackGrid(make_client_app(defaults, fault=fault), 3), {}, defaults)
    r1, r2 = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(f["client"], f["kind"]) for f in r1["failures"]] == [(0, "rejected")]
    assert "num_samples 1000000000 claimed" in r1["failures"][0]["reason"]
    assert [(f["client"], f["kind"]) for f in r2["failures"]] == [(1, "rejected")]
    assert "not a finite number" in r2["failures"][0]["reason"]
    assert r1["num_aggregated"] == 2 and r2["num_aggregated"] == 2
    assert summary["status"] == "completed"


def test_node_with_wrong_partition_config_is_left_out(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="deltamask")
    defaults = {**TINY, "rounds": 1, "head-warmup-rounds": 1, "clients-per-round": 3, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    grid = LoopbackGrid(make_client_app(defaults), 3, node_config={2: {"num-partitions": 5}})
    run_server(grid, {}, defaults)
    (r1,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert r1["selected"] == [0, 1] and r1["num_replies"] == 2
    assert any("refused to join" in r.getMessage() and "num-partitions=5" in r.getMessage() for r in caplog.records)


def test_lost_node_error_reply_is_matched_to_its_message(tmp_path) -> None:
    """Flower answers for a lost node with an error reply sent by the SuperLink (node 1): it must be
    recorded as that client's node-lost failure, not ignored as a reply from an unexpected node."""
    defaults = {**TINY, "rounds": 2, "clients-per-round": 3, "out-dir": str(tmp_path), "node-wait-timeout": 0, "round-timeout": 30.0}
    t0 = __import__("time").time()
    run_server(LoopbackGrid(make_client_app(defaults), 3, unavailable=[(2, 1)]), {}, defaults)
    assert __import__("time").time() - t0 < 25  # not waiting out the round timeout
    r2 = read_jsonl(tmp_path / "metrics.jsonl")[1]
    (f,) = r2["failures"]
    assert (f["client"], f["kind"], f["node"]) == (1, "node-lost", 1001)
    assert "Flower error 5" in f["reason"] and "Node Unavailable" in f["reason"]
    assert r2["num_replies"] == 2 and not r2["skipped_update"]


def test_no_node_joining_fails_the_run_naming_the_nodes(tmp_path) -> None:
    from deltamask.errors import RunFailed

    defaults = {**TINY, "rounds": 2, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    grid = LoopbackGrid(make_client_app(defaults), 3, node_config={i: {"num-partitions": 2} for i in range(3)})
    with pytest.raises(RunFailed, match="no node joined") as e:
        run_server(grid, {}, defaults)
    msg = str(e.value)
    assert all(f"node {n}" in msg for n in (1000, 1001, 1002)) and "num-partitions=3" in msg  # the fix
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "no node joined" in summary["failure"]
    assert not (tmp_path / "model.safetensors").exists()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_flower_resume_ends_as_uninterrupted(tmp_path) -> None:
    """The ServerApp stops after round 2 (as when its SuperLink dies); a new run with resume=true in the
    same out-dir (new nodes: every client cache is gone) ends exactly as the local engine's full run."""
    base = {**TINY, "rounds": 4, "clients-per-round": 2, "out-dir": str(tmp_path / "flower")}
    import deltamask.run.round as round_mod

    real = round_mod._one_round
    calls = {"n": 0}

    def stop_after_two(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        if calls["n"] == 2:
            raise KeyboardInterrupt("SuperLink gone")
        calls["n"] += 1
        return real(*a, **kw)

    round_mod._one_round = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            run_server(LoopbackGrid(make_client_app(base), 3), {}, base)
    finally:
        round_mod._one_round = real
    assert len(read_jsonl(tmp_path / "flower" / "metrics.jsonl")) == 2
    with pytest.raises(Exception, match="already holds a run"):  # a fresh run does not overwrite it
        run_server(LoopbackGrid(make_client_app(base), 3), {}, base)
    resumed = {**base, "resume": True}
    run_server(LoopbackGrid(make_client_app(resumed), 3), {}, resumed)
    run_local(tiny_config(rounds=4, clients_per_round=2), tmp_path / "local")
    a, b = read_jsonl(tmp_path / "flower" / "metrics.jsonl"), read_jsonl(tmp_path / "local" / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in comparable(r).items() if not k.startswith("downlink")}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    from safetensors.numpy import load_file

    sa, sb = load_file(str(tmp_path / "flower" / "state.safetensors")), load_file(str(tmp_path / "local" / "state.safetensors"))
    for k in [k for k in sb if k.startswith("server/")]:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["status"] == "completed"


def _same_extra(flower_dir, local_dir) -> None:  # noqa: ANN001
    """The server's downlink history (theta versions, levels, replayable payloads) is identical too."""
    from safetensors.numpy import load_file

    sa, sb = load_file(str(flower_dir / "state.safetensors")), load_file(str(local_dir / "state.safetensors"))
    keys = {k for k in sb if k.startswith("extra/dl/")}
    assert keys and keys == {k for k in sa if k.startswith("extra/dl/")}
    for k in keys:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.parametrize("mode", ["cond", "replay", "auto"])
def test_parity_with_local_engine_for_every_downlink_mode(tmp_path, mode: str) -> None:
    """Theta coded against each node's cached version (issue 9): bit-identical to the local engine, and the
    mode is really used (one client per round, so caches fall 1..R rounds behind)."""
    defaults = {**TINY, "rounds": 6, "clients-per-round": 1, "downlink": mode, "out-dir": str(tmp_path / "flower")}
    run_server(LoopbackGrid(make_client_app(defaults), 3), {}, defaults)
    run_local(tiny_config(rounds=6, clients_per_round=1, downlink=mode), tmp_path / "local")
    assert_same_run(tmp_path / "flower", tmp_path / "local")
    _same_extra(tmp_path / "flower", tmp_path / "local")
    recs = read_jsonl(tmp_path / "flower" / "metrics.jsonl")
    used = set().union(*(r.get("downlink_modes", {}).keys() for r in recs))
    assert (mode in used) if mode != "auto" else bool(used - {"snapshot", "same"}), used


def test_a_node_whose_cache_went_stale_gets_a_snapshot_in_the_same_round(tmp_path, caplog) -> None:
    """A node's stored theta changed behind the server's back (as when a late ClientApp of an earlier round
    wrote its state last): the ClientApp refuses the digest, the server re-sends a snapshot in the same
    round, and the run ends exactly as the local engine's."""
    from deltamask.engines.flower.records import load_client_state, save_client_state

    caplog.set_level(logging.WARNING, logger="deltamask")
    holder: dict = {}

    def fault(rnd, pid):  # noqa: ANN001, ANN202
        ctx = holder["grid"].contexts[1000 + pid]
        cache = load_client_state(ctx.state)
        if rnd in (3, 4) and "theta" in cache:  # a client that gets a snapshot overwrites it; the others must catch it
            th = cache["theta"].copy()
            th[0] = 0.5 if th[0] != 0.5 else 0.25
            cache["theta"] = th
            save_client_state(ctx.state, cache)
            holder["done"] = True
        return None

    # downlink=cond: a client holding a version of counts gets the conditional code (at this tiny N a
    # snapshot is often smaller, and a snapshot would simply overwrite the damage)
    defaults = {**TINY, "rounds": 5, "clients-per-round": 2, "downlink": "cond", "out-dir": str(tmp_path / "flower")}
    holder["grid"] = grid = LoopbackGrid(make_client_app(defaults, fault=fault), 3)
    run_server(grid, {}, defaults)
    run_local(tiny_config(rounds=5, clients_per_round=2, downlink="cond"), tmp_path / "local")
    a, b = read_jsonl(tmp_path / "flower" / "metrics.jsonl"), read_jsonl(tmp_path / "local" / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in comparable(r).items() if not k.startswith("downlink") and k != "stale_resent"}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert holder.get("done") and any(r.get("stale_resent") for r in a)
    assert "stale theta cache" in caplog.text


@pytest.mark.parametrize("claimed,recorded", [("stale-cache", None), ("rejected", "error"), ("made-up", "error"), ("error", "error")])
def test_a_node_may_name_only_a_client_failure_kind(tmp_path, claimed, recorded) -> None:
    """A node's error reply names its failure's kind beside the reason; the server takes only the kinds a
    client can have (``stale-cache`` gets it a snapshot in the same round, which it then answers); any other
    kind it names, even one the server uses itself, is recorded as a plain ``error``."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from deltamask.engines.flower.records import META_KEY, unpack_meta

    defaults = {**TINY, "rounds": 3, "clients-per-round": 3, "out-dir": str(tmp_path)}
    app = make_client_app(defaults)
    forged: list[int] = []

    def hostile(msg, ctx):  # noqa: ANN001, ANN202 - node 0 answers round 3's first message with a forged error
        reply = app(msg, ctx)
        meta = unpack_meta(msg.content)
        if ctx.node_config["partition-id"] == 0 and int(meta.get("round", -1)) == 3 and not forged:
            forged.append(1)
            content = RecordDict({META_KEY: ConfigRecord({"round": 3, "client-id": 0, "error": "forged", "error-kind": claimed})})
            return Message(content, reply_to=msg)
        return reply

    run_server(LoopbackGrid(hostile, 3), {}, defaults)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert forged
    if recorded is None:
        assert last["stale_resent"] == [0] and last["failures"] == [] and last["num_aggregated"] == 3
    else:
        assert last["failures"] == [{"client": 0, "reason": "forged", "kind": recorded, "node": 1000}]
        assert "stale_resent" not in last

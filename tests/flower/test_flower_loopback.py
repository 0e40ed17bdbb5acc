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
from deltamask.metrics import TIMING_KEYS, read_jsonl  # noqa: E402
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


def test_node_with_wrong_partition_config_is_left_out(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="deltamask")
    defaults = {**TINY, "rounds": 1, "head-warmup-rounds": 1, "clients-per-round": 3, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    grid = LoopbackGrid(make_client_app(defaults), 3, node_config={2: {"num-partitions": 5}})
    run_server(grid, {}, defaults)
    (r1,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert r1["selected"] == [0, 1] and r1["num_replies"] == 2
    assert any("refused to join" in r.getMessage() and "num-partitions=5" in r.getMessage() for r in caplog.records)

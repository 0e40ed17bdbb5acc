"""Nothing a Flower run writes is a pickle: the run folder and the per-node disk cache (issue 10, item 5)."""

from __future__ import annotations


import pytest

pytest.importorskip("flwr")

from dmtest import TINY, assert_no_pickle  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402

pytestmark = pytest.mark.flower


def test_flower_loopback_run_writes_no_pickle(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("DELTAMASK_NODE_CACHE", str(cache))
    defaults = {**TINY, "rounds": 2, "out-dir": str(tmp_path / "run")}
    run_server(LoopbackGrid(make_client_app(defaults), 3), {}, defaults)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"metrics.jsonl", "state.safetensors", "model.safetensors", "summary.json"} <= names
    n = assert_no_pickle(tmp_path)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert n == len(written) >= 5
    # the node cache holds safetensors and JSON only
    assert {p.suffix for p in cache.rglob("*") if p.is_file()} == {".safetensors", ".json", ".log"}

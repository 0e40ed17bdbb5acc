"""A partition that no node serves (3 of 4 SuperNodes up) is said, not left to ``flwr log`` (issue 22): each
round's record lists the ``unavailable`` partitions, the status line names them, and ``summary.json`` has
``clients_never_joined``."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("flwr")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from deltamask.run.round import never_joined  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402

pytestmark = pytest.mark.flower


def test_never_joined_is_the_clients_unavailable_in_every_round() -> None:
    assert never_joined([], 4) == []
    assert never_joined([{"unavailable": [2, 3]}, {"unavailable": [3]}], 4) == [3]
    assert never_joined([{"unavailable": [3]}, {}], 4) == []  # available once: it joined


def test_a_partition_no_node_serves_is_reported(tmp_path, capsys, caplog) -> None:
    defaults = {**TINY, "rounds": 2, "num-clients": 3, "clients-per-round": 2, "out-dir": str(tmp_path / "run"), "progress": True,
                "node-wait-timeout": 2.0}
    grid = LoopbackGrid(make_client_app(defaults), 2, node_config={0: {"num-partitions": 3}, 1: {"num-partitions": 3}})
    with caplog.at_level(logging.WARNING, logger="deltamask"):
        s = run_server(grid, {}, defaults)
    assert s["status"] == "completed" and s["clients_never_joined"] == [2]
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["unavailable"] for r in recs] == [[2], [2]]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clients_never_joined"] == [2]
    assert "partitions [2] not served" in capsys.readouterr().err
    assert "partitions [2] never joined the run" in caplog.text


def test_the_local_engine_has_every_client(tmp_path) -> None:
    s = run_local(tiny_config(rounds=1), tmp_path)
    assert s["clients_never_joined"] == []
    assert all("unavailable" not in r for r in read_jsonl(tmp_path / "metrics.jsonl"))

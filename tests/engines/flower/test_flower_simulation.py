"""Parity through Flower's own in-process simulation runtime (``run_simulation``, Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.engines.flower import make_client_app, make_server_app  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from test_flower_loopback import assert_same_run  # noqa: E402

pytestmark = [pytest.mark.flower, pytest.mark.slow]
SRC = str(Path(__file__).resolve().parents[3] / "src")


def test_run_simulation_matches_local_engine(tmp_path, monkeypatch) -> None:
    import torch
    from flwr.simulation import run_simulation

    # Ray workers import deltamask from the environment, and use num_cpus threads: give them this
    # process's thread count, since float reductions (and so the head's last bits) depend on it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    threads = torch.get_num_threads()
    defaults = {**TINY, "rounds": 2, "out-dir": str(tmp_path / "flower")}
    run_simulation(
        make_server_app(defaults),
        make_client_app(defaults),
        num_supernodes=TINY["num_clients"],
        backend_config={"client_resources": {"num_cpus": threads, "num_gpus": 0.0}, "init_args": {"num_cpus": threads}},
    )
    run_local(tiny_config(rounds=2), tmp_path / "local")
    assert_same_run(tmp_path / "flower", tmp_path / "local")

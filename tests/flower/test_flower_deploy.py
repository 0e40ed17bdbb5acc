"""A real deployment on 127.0.0.1: ``flower-superlink``, two ``flower-supernode`` processes (each with its
own partition), the app submitted with ``flwr run``, and the run's final status read back with
``flwr ls`` (``flwr run`` exits 0 even when the ServerApp fails). Every process started here is stopped by
its pid (its process group) whatever happens. Run with ``pytest -m flower_deploy``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
import tomli_w  # noqa: E402  (a dependency of flwr)

from dmtest import TINY  # noqa: E402
from deltamask.metrics import read_jsonl  # noqa: E402

pytestmark = pytest.mark.flower_deploy
ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tool(name: str) -> str:
    p = BIN / name
    return str(p) if p.exists() else name


class Federation:
    """SuperLink + SuperNodes on 127.0.0.1 in their own process groups, and the ``flwr`` CLI set up
    to talk to them (temporary FLWR_HOME, telemetry and dependency installation off)."""

    def __init__(self, tmp: Path, node_configs: list[str]) -> None:
        self.tmp = tmp
        self.node_configs = node_configs
        self.procs: dict[str, subprocess.Popen] = {}
        home = tmp / "flwr-home"
        home.mkdir()
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.link_port, *self.node_ports = free_ports(1 + len(node_configs))
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        self._spawn("superlink", [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.link_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.procs["superlink"].poll() is not None:
                    raise RuntimeError(f"flower-superlink did not come up\n{self.logs()}") from None
                time.sleep(0.5)
        for i, (nc, port) in enumerate(zip(self.node_configs, self.node_ports)):
            self._spawn(f"supernode{i}", [tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                                          "--host", "127.0.0.1", "--port", str(port), "--node-config", nc])

    def kill(self, name: str) -> None:
        """Stop one process and everything it spawned (its process group, whose id is its pid)."""
        p = self.procs[name]
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children left in the group after the leader exited
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)

    def flwr(self, *args: str, timeout: float = 180) -> dict[str, Any]:
        r = subprocess.run([tool("flwr"), *args, "--format", "json"], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)
        try:
            return json.loads(r.stdout[r.stdout.index("{"):])
        except ValueError:
            raise AssertionError(f"flwr {' '.join(args)} printed no JSON: {r.stdout}\n{r.stderr}") from None

    def submit(self, run_config: dict[str, Any]) -> int:
        rc = self.tmp / "run-config.toml"
        rc.write_text(tomli_w.dumps(run_config))
        res = self.flwr("run", str(APP), "deploy", "--run-config", str(rc))
        assert res.get("success"), f"{res}\n{self.logs()}"
        return int(res["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        return self.flwr("ls", "deploy", "--run-id", str(run_id), timeout=60)["runs"][0]

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.run_info(run_id)
            if info["status"].startswith("finished"):
                return info
            time.sleep(3)
        raise AssertionError(f"run {run_id} not finished after {timeout}s\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.tmp.glob("*.log")):
            out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


@pytest.fixture
def federation(tmp_path):  # noqa: ANN201
    feds: list[Federation] = []

    def make(node_configs: list[str]) -> Federation:
        fed = Federation(tmp_path, node_configs)
        feds.append(fed)
        fed.start()
        return fed

    yield make
    for fed in feds:
        fed.stop()


def run_config(out: Path, **extra: Any) -> dict[str, Any]:
    rc = {k.replace("_", "-"): v for k, v in TINY.items()}
    rc.update({"num-clients": 2, "clients-per-round": 2, "rounds": 2, "out-dir": str(out), "round-timeout": 120.0})
    rc.update(extra)
    return rc


def test_two_supernodes_run_two_rounds(federation, tmp_path) -> None:
    fed = federation(["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"])
    out = tmp_path / "out"
    run_id = fed.submit(run_config(out))
    info = fed.wait(run_id, timeout=480)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert r["num_replies"] == 2 and r["failures"] == [] and r["accuracy"] is not None
        assert r["uplink_bits"] > 0 and r["flower_uplink_message_bytes"] > r["uplink_bits"] // 8
    assert recs[1]["phase"] == "mask"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["rounds_completed"] == 2
    assert (out / "model.safetensors").is_file() and (out / "accuracy.png").is_file()
    assert info["network-traffic"]["total-bytes"] > 0


def test_killed_supernode_is_dropped_and_run_finishes(federation, tmp_path) -> None:
    # node 1 stalls in round 2 (so the kill lands inside that round), then is killed
    fed = federation(["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2 test-fault='hang:600@2'"])
    out = tmp_path / "out"
    run_id = fed.submit(run_config(out, **{"round-timeout": 45.0}))
    deadline = time.time() + 360
    while len(read_jsonl(out / "metrics.jsonl")) < 1:
        assert time.time() < deadline, f"round 1 never finished\n{fed.logs()}"
        assert not fed.run_info(run_id)["status"].startswith("finished"), fed.logs()
        time.sleep(2)
    fed.kill("supernode1")
    info = fed.wait(run_id, timeout=300)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    r1, r2 = read_jsonl(out / "metrics.jsonl")
    assert r1["num_replies"] == 2
    assert r2["num_replies"] == 1 and [f["client"] for f in r2["failures"]] == [1], r2["failures"]
    assert not r2["skipped_update"]
    assert (out / "summary.json").is_file()

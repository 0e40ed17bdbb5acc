"""The node worker a deployment's ClientApp hands its computation to
(:mod:`deltamask.engines.flower.worker`): same result as computing in place, one worker serving every
round, gone with its anchor (the SuperNode), restarted after a crash, failures reported with a reason.
The deployment tests (test_flower_deploy.py) run it under real SuperNodes."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.config import ConfigError  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from deltamask.engines.flower import node, wire  # noqa: E402
from deltamask.engines.flower.worker import WorkerClient, WorkerError, socket_path  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402
from test_flower_loopback import assert_same_run  # noqa: E402

pytestmark = pytest.mark.flower


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def anchor(tmp_path, monkeypatch):  # noqa: ANN201
    """A stand-in for the SuperNode: the worker lives as long as this process."""
    monkeypatch.setenv("DELTAMASK_WORKER_DIR", str(tmp_path / "workers"))
    p = subprocess.Popen(["sleep", "600"])
    monkeypatch.setenv("DELTAMASK_WORKER_ANCHOR", str(p.pid))
    yield p
    p.kill()
    p.wait()


def worker_pids(log: Path) -> list[int]:
    return sorted({int(m) for m in re.findall(r"worker\[(\d+)\] serving", log.read_text())})


def test_worker_run_equals_local_and_one_worker_serves_every_round(tmp_path, anchor) -> None:
    defaults = {**TINY, "rounds": 3, "out-dir": str(tmp_path / "flower")}
    grid = LoopbackGrid(make_client_app(defaults), 3, node_config={i: {"worker": "on"} for i in range(3)})
    run_server(grid, {}, defaults)
    run_local(tiny_config(rounds=3), tmp_path / "local")
    assert_same_run(tmp_path / "flower", tmp_path / "local")
    log = socket_path(anchor.pid).with_suffix(".log")
    text = log.read_text()
    pids = worker_pids(log)
    assert len(pids) == 1, text  # started once, by the first message
    assert text.count("(train): ok") == 3 * 2, text  # 3 rounds x clients_per_round=2, all in that worker
    anchor.kill()
    anchor.wait()
    assert wait_gone(pids[0], 5), "the worker outlived its anchor"
    assert not socket_path(anchor.pid).exists()
    assert "is gone" in log.read_text()


def test_killed_worker_is_replaced_and_a_death_mid_request_is_reported(tmp_path, anchor) -> None:
    client = WorkerClient()
    first = client.call({"op": "ping"})[0]["pid"]
    assert client.call({"op": "ping"})[0]["pid"] == first  # the same worker answers again
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first)
    deadline = time.time() + 10  # the leader is a zombie before its last thread has closed the socket
    while (s := client._connect()) is not None and time.time() < deadline:
        s.close()
        time.sleep(0.05)
    assert client.path.exists()  # a stale socket, nobody listening: the next call starts a new worker
    second = client.call({"op": "ping"})[0]["pid"]
    assert second != first and not gone(second)
    reply, _ = client.call({"op": "nonsense"})
    assert not reply["ok"] and "unknown request 'nonsense'" in reply["error"]


def test_worker_dying_mid_request_fails_the_client_with_a_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAMASK_WORKER_DIR", str(tmp_path))
    path = socket_path(12345)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def read_then_die() -> None:  # a worker that takes the request and vanishes
        conn, _ = srv.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=read_then_die)
    t.start()
    with pytest.raises(WorkerError, match="died while computing"):
        WorkerClient(anchor=12345).call({"op": "ping"})
    t.join()
    srv.close()


def test_worker_that_cannot_start_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAMASK_WORKER_DIR", str(tmp_path))
    p = subprocess.Popen(["true"])
    p.wait()  # an anchor that is already gone: the worker refuses to start
    with pytest.raises(WorkerError, match="(?s)exited with code 0 while starting.*anchor process .* is gone"):
        WorkerClient(anchor=p.pid).call({"op": "ping"})


def test_client_failure_in_worker_is_a_reply_with_the_reason(tmp_path, anchor) -> None:
    # a client with no data fails inside the worker; the worker lives on and says why
    defaults = {**TINY, "rounds": 1, "head-warmup-rounds": 1, "out-dir": str(tmp_path / "f"), "min-partition-size": 0,
                "num-clients": 3, "clients-per-round": 3, "train-samples": 240}
    client = WorkerClient()
    header = {"op": "train", "round": 1, "run_config": {}, "node_config": {"partition-id": 7, "num-partitions": 3},
              "defaults": defaults, "state_arrays": {}, "state_scalars": {}}
    reply, _ = client.call(header, {"payload": b""})
    assert not reply["ok"] and "partition-id=7 is outside 0..2" in reply["error"]
    assert client.call({"op": "ping"})[0]["ok"]


def test_frame_roundtrip_and_corrupt_frames() -> None:
    import numpy as np

    a, b = socket.socketpair()
    arrays = {"theta": np.arange(7, dtype=np.float32).reshape(7), "m": np.ones((2, 3), dtype=np.uint8)}
    spec, blobs = wire.pack_arrays(arrays, "s/")
    blobs["payload"] = b"\x00\x01" * 1000
    wire.send_frame(a, {"op": "x", "spec": spec}, blobs)
    header, got = wire.recv_frame(b)
    assert header["op"] == "x" and got["payload"] == blobs["payload"]
    back = wire.unpack_arrays(header["spec"], got, "s/")
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype
    a.sendall(struct.pack(">Q", wire.MAX_HEADER + 1))  # a header length beyond the bound
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.recv_frame(b)
    a.sendall(struct.pack(">Q", 3) + b"{x}")
    with pytest.raises(wire.WireError, match="malformed"):
        wire.recv_frame(b)
    with pytest.raises(wire.WireError, match="shape"):
        wire.unpack_arrays({"t": ["<f4", [5]]}, {"s/t": b"\x00" * 8}, "s/")
    a.close()
    with pytest.raises(wire.WireError, match="closed"):
        wire.recv_frame(b)


def test_worker_setting(monkeypatch) -> None:
    assert node.uses_worker({"worker": "on"}) and not node.uses_worker({"worker": "off"})
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    assert node.uses_worker({})  # auto: a deployment's per-message process
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert not node.uses_worker({}) and not node.uses_worker({"worker": "auto"})
    with pytest.raises(ConfigError, match="use auto, on or off"):
        node.uses_worker({"worker": "sometimes"})


def test_deployment_clientapp_imports_no_torch() -> None:
    code = "import sys, deltamask.engines.flower.client_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_a_failing_clientapp_names_its_failure_kind_without_torch() -> None:
    """The ClientApp's failure path resolves the kind a worker's update failed with (stale-cache passes,
    anything outside the client kinds is error) with the torch-free errors module: a failing node never
    pays torch's import."""
    code = (
        "import sys\n"
        "from deltamask.engines.flower import client_app\n"
        "from deltamask.engines.flower.worker import WorkerError\n"
        "kinds = [client_app.failure_kind(e) for e in (WorkerError('x', 'stale-cache'), WorkerError('x', 'rejected'), "
        "WorkerError('x'), ValueError('x'))]\n"
        "print(kinds, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['stale-cache', 'error', 'error', 'error'] False"


def test_default_anchor_is_the_supernode_behind_its_superexec() -> None:
    # a stand-in for Flower's chain SuperNode -> flower-superexec --parent-pid PID -> flwr-clientapp
    child = "from deltamask.engines.flower.worker import default_anchor; print(default_anchor())"
    parent = f"import subprocess, sys; sys.stdout.write(subprocess.run([{sys.executable!r}, '-c', {child!r}], capture_output=True, text=True).stdout)"
    fake = f'exec -a /opt/venv/bin/flower-superexec {sys.executable} -c "{parent}" --parent-pid 424242'
    out = subprocess.run(["bash", "-c", fake], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "424242"
    # any other parent: the parent itself
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.strip()
    assert out != "424242" and int(out) > 0


def test_unknown_node_config_key_is_refused() -> None:
    cfg = tiny_config()
    assert node.node_partition({"partition-id": 1, "num-partitions": 3, "worker": "off", "cache-dir": "none"}, cfg) == 1
    with pytest.raises(node.NodeRefusal, match="unknown node_config key.*workers"):
        node.node_partition({"partition-id": 1, "num-partitions": 3, "workers": "off"}, cfg)

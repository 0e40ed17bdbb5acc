"""A real deployment on 127.0.0.1: ``flower-superlink``, ``flower-supernode`` processes (each with its
own partition), the app submitted with ``flwr run``, and the run's final status read back with
``flwr ls`` (``flwr run`` exits 0 even when the ServerApp fails). The commands are the ones
docs/flower.md shows ("Deployment" section; tests/engines/flower/test_flower_units.py checks the flags). Every
process started here is stopped by its process group whatever happens, and so is every process group its
descendants opened (the SuperLink starts its ``flower-superexec`` in a session of its own). Run with
``pytest -m flower_deploy``."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
import tomli_w  # noqa: E402  (a dependency of flwr)

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from deltamask.engines.flower.node_cache import cache_counts  # noqa: E402

pytestmark = pytest.mark.flower_deploy
ROOT = Path(__file__).resolve().parents[3]
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


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        out[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    kids: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        kids.setdefault(parent, []).append(child)
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid) if alive(pid) else None
    except ProcessLookupError:
        return None


def killpg_hard(pgid: int, wait: float = 10) -> None:
    """SIGTERM a process group, SIGKILL what is left after ``wait`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


class Federation:
    """SuperLink + SuperNodes on 127.0.0.1 in their own process groups, and the ``flwr`` CLI set up
    to talk to them (temporary FLWR_HOME, telemetry and dependency installation off)."""

    def __init__(self, tmp: Path, node_configs: list[str], database: Path | None = None) -> None:
        self.tmp = tmp
        self.node_configs = node_configs
        self.database = database
        self.procs: dict[str, subprocess.Popen] = {}
        self.conn = "deploy"  # the flwr connection (FLWR_HOME/config.toml) the operator's commands use
        self.groups: set[int] = set()  # process groups opened by descendants (e.g. the SuperLink's superexec)
        home = tmp / "flwr-home"
        home.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_HOME": str(home),
            "DELTAMASK_WORKER_DIR": str(tmp / "workers"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.link_port, *self.node_ports = free_ports(1 + len(node_configs))
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # a restarted process appends to its log
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_superlink(self) -> None:
        # docs/flower.md: flower-superlink --insecure --host 127.0.0.1 --port PORT [--database FILE] ...
        args = [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
                "--disable-runtime-dependency-installation"]
        if self.database is not None:
            args += ["--database", str(self.database)]
        self._spawn("superlink", args)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.link_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.procs["superlink"].poll() is not None:
                    raise RuntimeError(f"flower-superlink did not come up\n{self.logs()}") from None
                time.sleep(0.5)

    def start_node(self, i: int) -> None:
        # docs/flower.md: setsid flower-supernode --insecure --superlink HOST:PORT --host 127.0.0.1 --port PORT_I
        #                 --node-config "partition-id=I num-partitions=N ..."
        self._spawn(f"supernode{i}", [tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                                      "--host", "127.0.0.1", "--port", str(self.node_ports[i]), "--node-config", self.node_configs[i]])

    def start(self) -> None:
        self.start_superlink()
        for i in range(len(self.node_configs)):
            self.start_node(i)

    def kill(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one process and everything it spawned: its process group (whose id is its pid), and the
        groups its descendants opened (the SuperLink's flower-superexec runs in a session of its own)."""
        p = self.procs[name]
        self.groups |= {g for g in map(pgid_of, descendants(p.pid)) if g is not None} - {os.getpgrp()}
        if p.poll() is None:
            for s, wait in ((sig, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(p.pid, s)
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
        p.wait()

    def reap_groups(self) -> list[int]:
        """Kill the process groups descendants opened; returns those that still had live members."""
        left = []
        for g in sorted(self.groups - {os.getpgrp()}):
            try:
                os.killpg(g, 0)
            except (ProcessLookupError, PermissionError):
                continue
            left.append(g)
            killpg_hard(g, wait=5)
        return left

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)
        self.reap_groups()

    def workers(self) -> dict[int, str]:
        """Live node workers of this federation: pid -> socket path (from their command lines)."""
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or not alive(int(d)):
                continue
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"deltamask.engines.flower.worker" in cmd and str(self.tmp / "workers").encode() in b" ".join(cmd):
                out[int(d)] = cmd[cmd.index(b"--socket") + 1].decode()
        return out

    def wait_no_workers(self, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while self.workers() and time.time() < deadline:
            time.sleep(0.2)
        assert not self.workers(), f"node workers outlived their SuperNodes: {self.workers()}"

    def flwr(self, *args: str, timeout: float = 180) -> dict[str, Any]:
        r = subprocess.run([tool("flwr"), *args, "--format", "json"], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)
        try:
            return json.loads(r.stdout[r.stdout.index("{"):])
        except ValueError:
            raise AssertionError(f"flwr {' '.join(args)} printed no JSON: {r.stdout}\n{r.stderr}") from None

    def submit(self, run_config: dict[str, Any], app: Path = APP) -> int:
        rc = self.tmp / "run-config.toml"
        rc.write_text(tomli_w.dumps(run_config))
        res = self.flwr("run", str(app), self.conn, "--run-config", str(rc))
        assert res.get("success"), f"{res}\n{self.logs()}"
        return int(res["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        return self.flwr("ls", self.conn, "--run-id", str(run_id), timeout=60)["runs"][0]

    def online_nodes(self) -> list[str]:
        res = self.flwr("supernode", "ls", self.conn, timeout=60)
        return [n["node-id"] for n in res.get("nodes", []) if n.get("status") == "online"]

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

    def make(node_configs: list[str], database: Path | None = None) -> Federation:
        fed = Federation(tmp_path, node_configs, database)
        feds.append(fed)
        fed.start()
        return fed

    yield make
    for fed in feds:
        fed.stop()
    for fed in feds:  # every node worker goes with its SuperNode
        fed.wait_no_workers()


def run_config(out: Path, **extra: Any) -> dict[str, Any]:
    rc = {k.replace("_", "-"): v for k, v in TINY.items()}
    rc.update({"num-clients": 2, "clients-per-round": 2, "rounds": 2, "out-dir": str(out), "round-timeout": 120.0})
    rc.update(extra)
    return rc


def test_two_supernodes_run_two_rounds(federation, tmp_path) -> None:
    fed = federation(["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"])
    out = tmp_path / "out"
    tracked = importlib.util.find_spec("mlflow") is not None and importlib.util.find_spec("tensorboard") is not None
    # issue 21: with a root set, which the ServerApp draws from its own copy of the data set
    run_id = fed.submit(run_config(out, **{"root-samples": 30}, **({"tracking": "tensorboard,mlflow"} if tracked else {})))
    info = fed.wait(run_id, timeout=480)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2]
    assert recs[0]["phase"] == "head" and sorted(c["client"] for c in recs[0]["clients"]) == [0, 1]
    assert all(c["trust"] >= 0 and c["root_norm"] > 0 for c in recs[0]["clients"]), recs[0]["clients"]
    if tracked:  # issue 24: the ServerApp of a real deployment logs the run, read back with the trackers' own readers
        from mlflow.tracking import MlflowClient
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        from deltamask.run.tracking import read_tracking

        rec = read_tracking(out)["mlflow"]
        client = MlflowClient(rec["tracking_uri"])
        assert client.get_run(rec["run_id"]).info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(rec["run_id"], "accuracy")] == [(r["round"], r["accuracy"]) for r in recs]
        assert "model.safetensors" in {a.path for a in client.list_artifacts(rec["run_id"])}
        ea = EventAccumulator(str(out / "tensorboard"))
        ea.Reload()
        assert [e.step for e in ea.Scalars("accuracy")] == [1, 2]
    for r in recs:
        assert r["num_replies"] == 2 and r["failures"] == [] and r["accuracy"] is not None
        assert r["uplink_bits"] > 0 and r["flower_uplink_message_bytes"] > r["uplink_bits"] // 8
    assert recs[1]["phase"] == "mask"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["rounds_completed"] == 2
    assert (out / "model.safetensors").is_file() and (out / "accuracy.png").is_file()
    assert info["network-traffic"]["total-bytes"] > 0
    # each SuperNode computed in one long-lived worker (flwr-clientapp processes only forwarded bytes)
    logs = sorted((tmp_path / "workers").glob("node-*.log"))
    assert len(logs) == 2 and len(fed.workers()) == 2, (logs, fed.workers())
    for log in logs:
        text = log.read_text()
        assert text.count(" serving on ") == 1 and text.count("(train): ok") == 2, text
    fed.stop()
    fed.wait_no_workers()


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
    before = fed.workers()
    assert len(before) == 2, before  # one per node, started in round 1
    fed.kill("supernode1")
    info = fed.wait(run_id, timeout=300)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    after = fed.workers()
    assert len(after) == 1 and set(after) < set(before), (before, after)  # node 1's worker went with it
    r1, r2 = read_jsonl(out / "metrics.jsonl")
    assert r1["num_replies"] == 2
    assert r2["num_replies"] == 1 and [f["client"] for f in r2["failures"]] == [1], r2["failures"]
    assert not r2["skipped_update"]
    assert (out / "summary.json").is_file()


def test_mismatched_partitions_fail_the_run(federation, tmp_path) -> None:
    # every node is started for 2 partitions, the run has 3 clients: every node refuses, none joins
    fed = federation(["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"])
    out = tmp_path / "out"
    run_id = fed.submit(run_config(out, **{"num-clients": 3, "node-wait-timeout": 10.0}))
    info = fed.wait(run_id, timeout=240)
    assert info["status"] == "finished:failed", f"{info}\n{fed.logs()}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    failure = summary["failure"]
    assert "no node joined" in failure and "num-partitions" in failure and "num-clients=3" in failure, failure
    for nid in fed.online_nodes():  # each refusing node is named with its reason
        assert f"node {nid}:" in failure, (nid, failure)
    assert not (out / "model.safetensors").exists()


def test_node_cache_is_reused_across_rounds(federation, tmp_path) -> None:
    # node 0 computes in its node worker (the default), node 1 in each message's own process (worker='off')
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    fed = federation([f"partition-id={i} num-partitions=2 cache-dir='{c}'" + (" worker='off'" if i else "") for i, c in enumerate(caches)])
    run_id = fed.submit(run_config(tmp_path / "out1", rounds=3))
    info = fed.wait(run_id, timeout=360)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    counts = cache_counts(caches[0])  # the worker built the entry once and kept it in memory
    assert counts["build"] == 1 and counts["hit"] == 0, counts
    counts = cache_counts(caches[1])  # every round's fresh ClientApp process found the entry its first round built
    assert counts["build"] == 1 and counts["hit"] >= 2, counts
    assert len(fed.workers()) == 1
    # a key that changes the client's data (the seed draws the split) builds a new entry
    run_id = fed.submit(run_config(tmp_path / "out2", rounds=1, seed=1))
    info = fed.wait(run_id, timeout=240)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    for c in caches:
        assert cache_counts(c)["build"] == 2, (c, cache_counts(c))


def _lines(path: Path) -> int:
    return len(read_jsonl(path)) if path.is_file() else 0


def test_superlink_restart_and_resume_match_uninterrupted(federation, tmp_path) -> None:
    from safetensors.numpy import load_file

    from deltamask.engines.local import run_local

    fed = federation(["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"], database=tmp_path / "state.db")
    a, b = tmp_path / "A", tmp_path / "B"
    keys = {"rounds": 4, "round-timeout": 60.0, "node-wait-timeout": 90.0}
    run1 = fed.submit(run_config(a, **keys))
    deadline = time.time() + 300
    while _lines(a / "metrics.jsonl") < 2:
        assert time.time() < deadline, f"round 2 never finished\n{fed.logs()}"
        assert not fed.run_info(run1)["status"].startswith("finished"), fed.logs()
        time.sleep(1)
    # the SuperLink crashes (SIGKILL to its process group); its ServerApp runs under a flower-superexec in
    # a session of its own: note which of those processes outlive the SuperLink
    old = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
           for pid in descendants(fed.procs["superlink"].pid)}
    fed.kill("superlink", sig=signal.SIGKILL)
    # the SuperNodes stay up and reconnect with their node ids and keys (the same --database): a SuperNode
    # restarted without SuperNode authentication comes back with a new key pair, a new identity, and is
    # refused its partition (issue 21; tests/engines/flower/test_flower_identity.py)
    fed.start_superlink()
    deadline = time.time() + 120
    while len(fed.online_nodes()) < 2:
        assert time.time() < deadline, f"the SuperNodes did not reconnect\n{fed.logs()}"
        time.sleep(2)
    before = (_lines(a / "metrics.jsonl"), (a / "state.safetensors").stat().st_mtime)
    time.sleep(5)
    observed = {
        "orphans_alive": {pid: cmd for pid, cmd in old.items() if alive(pid)},
        "out_dir_changed_after_restart": (_lines(a / "metrics.jsonl"), (a / "state.safetensors").stat().st_mtime) != before,
        "rounds_in_A_at_resume": _lines(a / "metrics.jsonl"),
        "first_run_status_after_restart": fed.run_info(run1)["status"],
    }
    observed["orphan_groups_killed"] = fed.reap_groups()  # nothing of the first ServerApp may stay alive
    print("\nobserved:", json.dumps(observed, indent=1))
    assert not any(alive(pid) for pid in old), "the first ServerApp's processes survived their process group"
    run2 = fed.submit(run_config(a, **keys, resume=True))
    info = fed.wait(run2, timeout=360)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    print("first run status at the end:", fed.run_info(run1)["status"])

    cfg = tiny_config(num_clients=2, clients_per_round=2, rounds=4)
    run_local(cfg, b)
    sa, sb = load_file(str(a / "state.safetensors")), load_file(str(b / "state.safetensors"))
    server_keys = sorted(k for k in sb if k.startswith("server/"))
    assert server_keys and server_keys == sorted(k for k in sa if k.startswith("server/"))
    for k in server_keys:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["round"] for r in ra] == [1, 2, 3, 4]
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb]
    assert [r["uplink_bits"] for r in ra] == [r["uplink_bits"] for r in rb]
    assert json.loads((a / "summary.json").read_text())["status"] == "completed"
    assert (a / "model.safetensors").is_file()


#: round -> (client, fault) on 4 nodes: one in four fails every round, a different way each round. The hang
#: is last: a ClientApp that wakes after its round timed out would save its stale node state over the next
#: round's (a Flower context race noted in the session note), which is not what this test is about.
DEPLOY_FAULTS = {1: (3, "raise"), 2: (2, "truncated"), 3: (1, "oversized"), 4: (0, "wrong-codec"), 5: (3, "wrong-n"),
                 6: (2, "n32"), 7: (1, "exit"), 8: (0, "hang:90")}


def test_faults_under_load_on_four_supernodes(federation, tmp_path) -> None:
    from safetensors.numpy import load_file

    from deltamask.engines.local import run_local

    spec = {c: ",".join(f"{k}@{r}" for r, (cc, k) in DEPLOY_FAULTS.items() if cc == c) for c in range(4)}
    fed = federation([f"partition-id={c} num-partitions=4 test-fault='{spec[c]}'" for c in range(4)])
    out = tmp_path / "out"
    run_id = fed.submit(run_config(out, **{"num-clients": 4, "clients-per-round": 4, "min-replies": 2, "rounds": 8,
                                           "round-timeout": 45.0, "node-wait-timeout": 120.0}))
    # the ServerApp's peak RSS (VmHWM) as the rounds go by: a 2^32-n header in round 6 must not move it
    hwm: dict[int, int] = {}
    deadline = time.time() + 900
    while not fed.run_info(run_id)["status"].startswith("finished"):
        assert time.time() < deadline, fed.logs()
        for pid in descendants(fed.procs["superlink"].pid):
            try:
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    kb = int(next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM")).split()[1])
                    hwm[_lines(out / "metrics.jsonl")] = kb
            except (OSError, StopIteration, ValueError):
                pass
        time.sleep(1)
    info = fed.run_info(run_id)
    assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
    print("\nServerApp VmHWM (KiB) by rounds done:", hwm)
    before, after = max(v for k, v in hwm.items() if k <= 5), max(hwm.values())
    assert after - before < 200 * 1024, hwm  # flat: the forged 2^32 header allocated nothing
    recs = read_jsonl(out / "metrics.jsonl")
    # a ClientApp process that dies (exit) leaves no reply: Flower 1.42 reports nothing within the round,
    # so the server sees a timeout; a node worker that dies is an error with its log (test_flower_worker.py)
    expected_kind = {"raise": "error", "exit": "timeout", "hang:90": "timeout"}
    for r in recs:
        cid, kind = DEPLOY_FAULTS[r["round"]]
        assert [f["client"] for f in r["failures"]] == [cid], (r["round"], r["failures"])
        assert r["failures"][0]["kind"] == expected_kind.get(kind, "malformed"), (kind, r["failures"])
        assert r["num_aggregated"] == 3 and not r["skipped_update"], r
    # each round's update is that of its healthy replies alone: the local engine with those clients raising
    def raising(rnd: int, c: int) -> None:
        if DEPLOY_FAULTS[rnd][0] == c:
            raise RuntimeError("reference")

    run_local(tiny_config(num_clients=4, clients_per_round=4, min_replies=2, rounds=8), tmp_path / "ref", fault=raising)
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["accuracy"] for r in recs] == [r["accuracy"] for r in ref]
    sa, sb = load_file(str(out / "state.safetensors")), load_file(str(tmp_path / "ref" / "state.safetensors"))
    for k in sb:
        if k.startswith("server/"):
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_second_supernode_claiming_a_bound_partition_is_refused(tmp_path) -> None:
    """A third SuperNode started mid-run with partition-id=0 (bound to the first node that claimed it) is
    refused, named in metrics.jsonl, and the run completes with the two honest nodes. Each node is bound
    by the public key the SuperLink reports for it (Grid.get_nodes)."""
    from deltamask.run.state import load_state

    fed = Federation(tmp_path, ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2 test-fault='hang:25@1'",
                                "partition-id=0 num-partitions=2"])
    try:
        fed.start_superlink()
        fed.start_node(0)
        fed.start_node(1)
        out = tmp_path / "out"
        run_id = fed.submit(run_config(out, rounds=3))
        # round 1 is under way (both honest nodes bound) once a node worker trained; node 1 stalls 25 s in it
        deadline = time.time() + 300
        while not any("(train): ok" in f.read_text(errors="replace") for f in (tmp_path / "workers").glob("node-*.log")):
            assert time.time() < deadline, f"round 1 never started\n{fed.logs()}"
            assert not fed.run_info(run_id)["status"].startswith("finished"), fed.logs()
            time.sleep(1)
        honest = {int(n) for n in fed.online_nodes()}
        assert len(honest) == 2, honest
        fed.start_node(2)
        while len(fed.online_nodes()) < 3:
            assert time.time() < deadline, f"the third SuperNode did not connect\n{fed.logs()}"
            time.sleep(1)
        (rogue,) = {int(n) for n in fed.online_nodes()} - honest
        info = fed.wait(run_id, timeout=300)
        assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
        recs = read_jsonl(out / "metrics.jsonl")
        assert [r["round"] for r in recs] == [1, 2, 3]
        for r in recs:
            assert r["num_replies"] == 2 and r["failures"] == [], r
        refused = [e for r in recs for e in r.get("identity_refused", [])]
        assert len(refused) == 1, (refused, fed.logs())
        (e,) = refused
        assert (e["node"], e["claimed"]) == (rogue, 0) and e["bound_node"] in honest, (e, honest, rogue)
        assert f"node {rogue}" in e["reason"] and f"node {e['bound_node']}" in e["reason"], e
        ids = load_state(out)[0].identities
        assert sorted(ids) == [0, 1] and all(v.startswith("key:") for v in ids.values()), ids
    finally:
        fed.stop()
        fed.wait_no_workers()

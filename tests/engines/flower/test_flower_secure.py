"""The secure deployment of docs/flower.md ("Secure deployment"), with real processes on 127.0.0.1 (issue 22).

The files come from ``deltamask flower secure-files`` (a CA, the SuperLink's certificate, node key pairs, the
SuperExec secrets, a Fleet-only nginx configuration). The SuperLink runs with TLS, SuperNode authentication
and the SuperExec secret on a loopback port (the operator's side: ``flwr run``, ``flwr ls``); nginx, started
by the test, serves the nodes' port with the same certificate and forwards only the Fleet API. SuperNodes
connect through nginx with the CA and their registered keys. Checked: a full run passes and equals the local
engine; an unregistered node cannot join; a node without the CA cannot connect; the Control and Runtime
APIs are refused from the nodes' side while the operator's ``flwr`` works from the admin side.
Run with ``pytest -m flower_deploy``; needs nginx (Debian's package: ``.ci/run`` installs it)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from dmtest import tiny_config  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from test_flower_deploy import Federation, descendants, free_ports, killpg_hard, pgid_of, run_config, tool  # noqa: E402

pytestmark = pytest.mark.flower_deploy

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "secure-federation.sh"


class SecureFederation(Federation):
    """docs/flower.md's secure topology on one machine: SuperLink (TLS, node auth, SuperExec secret) on a
    loopback admin port; nginx on the nodes' port, Fleet API only; SuperNodes through nginx."""

    def __init__(self, tmp: Path, node_configs: list[str]) -> None:
        super().__init__(tmp, node_configs)
        self.sec = tmp / "secure"
        self.conn = "secure"  # the connection scripts/secure-federation.sh adds
        self.fleet_port, = free_ports(1)
        # the command docs/flower.md gives (deltamask flower secure-files)
        r = subprocess.run([tool("deltamask"), "flower", "secure-files", str(self.sec), "--nodes", str(len(node_configs) + 1),
                            "--listen", f"127.0.0.1:{self.fleet_port}", "--superlink", f"127.0.0.1:{self.link_port}"],
                           env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        home = Path(self.env["FLWR_HOME"])
        # the script adds the operator's connection "secure" (admin side); the test adds one through the nodes' port
        (home / "config.toml").write_text(
            f'[superlink.nodeside]\naddress = "127.0.0.1:{self.fleet_port}"\nroot-certificates = "{self.sec / "ca.crt"}"\n'
        )

    def start_topology(self, nodes: int) -> None:
        """SuperLink, proxy, key registration and ``nodes`` SuperNodes: scripts/secure-federation.sh, as
        docs/flower.md gives it."""
        env = {**self.env, "PATH": f"{Path(tool('flwr')).parent}:{self.env.get('PATH', '')}",
               "NODE_CONFIG_EXTRA": f"cache-dir='{self.tmp / 'node-cache'}'"}
        r = subprocess.run(["bash", str(SCRIPT), "start", str(self.sec), str(nodes), str(self.node_ports[0])], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{self.logs()}"

    def stop(self) -> None:
        groups = set()
        for f in self.sec.glob("*.pgid"):
            leader = int(f.read_text())
            groups |= {leader} | {g for g in map(pgid_of, descendants(leader)) if g is not None}
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.sec)], env=self.env, timeout=60)
        for g in sorted(groups - {os.getpgrp()}):
            killpg_hard(g, wait=10)
        super().stop()

    def start_node(self, i: int, ca: bool = True, key: int | None = None) -> None:
        s = self.sec / "nodes"
        k = i if key is None else key
        args = [tool("flower-supernode")]
        if ca:
            args += ["--root-certificates", str(self.sec / "ca.crt")]
        args += ["--superlink", f"127.0.0.1:{self.fleet_port}", "--auth-supernode-private-key", str(s / f"node-{k}.key"),
                 "--superexec-auth-secret-file", str(s / f"node-{k}.secret"), "--max-retries", "3",
                 "--host", "127.0.0.1", "--port", str(self.node_ports[i]), "--node-config", self.node_configs[i]]
        self._spawn(f"supernode{i}", args)

    def logs(self, tail: int = 3000) -> str:
        out = [super().logs(tail)]
        for f in sorted(self.sec.glob("*.log")) if hasattr(self, "sec") else []:
            out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


def https(port: int, path: str, ca: Path) -> int:
    """The status of an HTTPS POST to 127.0.0.1:port (certificate checked against ``ca``)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_secure_deployment(tmp_path) -> None:
    if not Path(NGINX).exists():
        if os.environ.get("DELTAMASK_REQUIRE_NGINX"):  # CI (.ci/run): a missing nginx is a failure, not a skip
            pytest.fail("nginx is not installed and DELTAMASK_REQUIRE_NGINX is set: bash scripts/install.sh --dev installs it")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; bash scripts/install.sh --dev does)")
    fed = SecureFederation(tmp_path, ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2",
                                      "partition-id=0 num-partitions=2"])
    try:
        fed.start_topology(2)  # registers nodes 0 and 1; node 2's key is never registered
        deadline = time.time() + 120
        while len(fed.online_nodes()) < 2:
            assert time.time() < deadline, f"the registered SuperNodes did not connect\n{fed.logs()}"
            time.sleep(1)

        # the Control and Runtime APIs are not reachable from the nodes' side; the Fleet API is
        ca = fed.sec / "ca.crt"
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/get-run", "/docs", "/openapi.json"):
            assert https(fed.fleet_port, path, ca) == 404, path
        assert https(fed.fleet_port, "/v1/fleet/get-run", ca) != 404  # forwarded (and refused by Flower: no node auth)
        assert https(fed.link_port, "/v1/control/list-runs", ca) != 404  # the admin side serves it
        nodeside = subprocess.run([tool("flwr"), "ls", "nodeside", "--format", "json"], env=fed.env, capture_output=True,
                                  text=True, timeout=120, cwd=tmp_path)
        answer = json.loads(nodeside.stdout[nodeside.stdout.index("{"):])
        assert answer.get("success") is False and "runs" not in answer, answer  # flwr itself, from the nodes' side: refused
        assert fed.flwr("ls", "secure", timeout=60).get("success")  # the operator's flwr works

        # an unregistered node (its own key) and a node without the CA cannot join
        fed.start_node(2, key=2)
        fed.node_configs.append("partition-id=1 num-partitions=2")
        fed.node_ports += free_ports(1)
        fed.start_node(3, ca=False, key=1)
        deadline = time.time() + 120
        log2, log3 = tmp_path / "supernode2.log", tmp_path / "supernode3.log"
        while not ("Failed to activate SuperNode" in log2.read_text(errors="replace")
                   and "CERTIFICATE_VERIFY_FAILED" in log3.read_text(errors="replace")):
            assert time.time() < deadline, f"the refused nodes did not fail as expected\n{fed.logs()}"
            time.sleep(1)
        assert len(fed.online_nodes()) == 2, fed.logs()
        assert "CERTIFICATE_VERIFY_FAILED" not in log2.read_text(errors="replace")  # node 2 got through TLS, then was refused
        access = (fed.sec / "nginx-access.log").read_text()
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in access, access[-2000:]  # Flower refused its key

        # a full run through the secure topology equals the local engine
        out = tmp_path / "out"
        run_id = fed.submit(run_config(out))
        info = fed.wait(run_id, timeout=480)
        assert info["status"] == "finished:completed", f"{info}\n{fed.logs()}"
        recs = read_jsonl(out / "metrics.jsonl")
        local = tmp_path / "local"
        run_local(tiny_config(num_clients=2, clients_per_round=2, rounds=2), local)
        ref = read_jsonl(local / "metrics.jsonl")
        assert [r["accuracy"] for r in recs] == [r["accuracy"] for r in ref]
        assert [r["uplink_bits"] for r in recs] == [r["uplink_bits"] for r in ref]
        assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
        s = json.loads((out / "summary.json").read_text())
        assert s["status"] == "completed"

        # a run config cannot write outside the server-side output root (DELTAMASK_OUT_ROOT, inherited by the
        # ServerApp from the SuperLink): refused before anything is written
        outside = Path(tempfile.mkdtemp(prefix="deltamask-outside-", dir="/var/tmp"))
        try:
            run_id = fed.submit(run_config(outside / "run", overwrite=True))
            info = fed.wait(run_id, timeout=300)
            assert info["status"] == "finished:failed", f"{info}\n{fed.logs()}"
            assert not (outside / "run").exists()
            log = subprocess.run([tool("flwr"), "log", str(run_id), "secure", "--show"], env=fed.env, capture_output=True,
                                 text=True, timeout=120, cwd=tmp_path)
            assert "outside the server's output root" in log.stdout + log.stderr, (log.stdout + log.stderr)[-3000:]
        finally:
            shutil.rmtree(outside, ignore_errors=True)
    finally:
        fed.stop()
        fed.wait_no_workers()

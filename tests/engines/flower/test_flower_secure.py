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
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from test_flower_deploy import Federation, free_ports, run_config, tool  # noqa: E402

pytestmark = pytest.mark.flower_deploy

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class SecureFederation(Federation):
    """docs/flower.md's secure topology on one machine: SuperLink (TLS, node auth, SuperExec secret) on a
    loopback admin port; nginx on the nodes' port, Fleet API only; SuperNodes through nginx."""

    def __init__(self, tmp: Path, node_configs: list[str]) -> None:
        super().__init__(tmp, node_configs)
        self.sec = tmp / "secure"
        self.fleet_port, = free_ports(1)
        # the command docs/flower.md gives (deltamask flower secure-files)
        r = subprocess.run([tool("deltamask"), "flower", "secure-files", str(self.sec), "--nodes", str(len(node_configs) + 1),
                            "--listen", f"127.0.0.1:{self.fleet_port}", "--superlink", f"127.0.0.1:{self.link_port}"],
                           env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        home = Path(self.env["FLWR_HOME"])
        # the operator's connection (admin side) and, for the test, one through the nodes' port
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.link_port}"\nroot-certificates = "{self.sec / "ca.crt"}"\n\n'
            f'[superlink.nodeside]\naddress = "127.0.0.1:{self.fleet_port}"\nroot-certificates = "{self.sec / "ca.crt"}"\n'
        )

    def start_superlink(self) -> None:
        s = self.sec
        self._spawn("superlink", [tool("flower-superlink"), "--ssl-ca-certfile", str(s / "ca.crt"), "--ssl-certfile", str(s / "server.crt"),
                                  "--ssl-keyfile", str(s / "server.key"), "--enable-supernode-auth",
                                  "--superexec-auth-secret-file", str(s / "superexec.secret"),
                                  "--host", "127.0.0.1", "--port", str(self.link_port), "--disable-runtime-dependency-installation"])
        self._wait_port(self.link_port, "superlink")

    def start_proxy(self) -> None:
        self._spawn("nginx", [NGINX, "-c", str(self.sec / "nginx.conf"), "-p", str(self.sec)])
        self._wait_port(self.fleet_port, "nginx")

    def _wait_port(self, port: int, name: str) -> None:
        import socket

        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.time() > deadline or self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} did not come up\n{self.logs()}") from None
                time.sleep(0.5)

    def register(self, i: int) -> None:
        res = self.flwr("supernode", "register", str(self.sec / "nodes" / f"node-{i}.pub"), "deploy", timeout=60)
        assert res.get("success"), res

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
        for f in sorted(self.sec.glob("nginx-*.log")) if hasattr(self, "sec") else []:
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
        fed.start_superlink()
        fed.start_proxy()
        fed.register(0)
        fed.register(1)  # node 2's key is never registered
        fed.start_node(0)
        fed.start_node(1)
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
        assert fed.flwr("ls", "deploy", timeout=60).get("success")  # the operator's flwr works

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
    finally:
        fed.stop()
        fed.wait_no_workers()

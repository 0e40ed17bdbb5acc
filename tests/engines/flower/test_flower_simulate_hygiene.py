"""``deltamask flower simulate`` as a user runs it (a subprocess): every log line printed once, and no
Flower or Ray process (GCS, raylet, agents, ClientApp actors, ...) left running once the command returns."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr")

pytestmark = [pytest.mark.flower, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent

#: a log line from any handler in play: Flower's console handler (``INFO :      msg``, maybe colored),
#: ``logging.basicConfig`` in ``deltamask.app.cli`` (``INFO flwr: msg``), either one behind Ray's
#: ``(ClientAppActor pid=12)`` prefix for lines forwarded from workers.
LOG_LINE = re.compile(
    r"^(?P<src>(?:\x1b\[\d+m)?\([^)]*pid=\d+[^)]*\)(?:\x1b\[0m)?\s+)?"
    r"(?:\x1b\[\d+m)?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\x1b\[0m)?\s*(?:[\w.]+)?:(?P<msg>.*)$"
)
PROCESS = re.compile(r"flwr|flower|ray|gcs_server|deltamask")


def log_records(text: str) -> list[tuple[str, str, str]]:
    """(source, level, message) of each log line, in order; continuation lines and other output skipped."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            out.append(((m["src"] or "").strip(), m["level"], m["msg"].strip()))
    return out


def processes() -> dict[int, tuple[str, str]]:
    """pid -> (state, command line) of every process."""
    r = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True)
    procs = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            procs[int(parts[0])] = (parts[1], parts[2] if len(parts) == 3 else "")
    return procs


def carries(pid: int, marker: str) -> bool:
    """Whether a process's environment holds ``marker`` (inherited from the command under test)."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_simulate_logs_once_and_leaves_no_processes(tmp_path: Path) -> None:
    exe = BIN / "deltamask"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from deltamask.app.cli import entry; entry()"]
    cmd += ["flower", "simulate", "--config", str(ROOT / "examples" / "flower" / "tiny.toml"), "--set", "rounds=2",
            "--out", str(tmp_path / "out")]
    # A marker in the environment finds this command's descendants (Ray's workers inherit it) among the
    # processes of whatever else runs on the machine, even ones that left the session.
    key, value = "DELTAMASK_HYGIENE_TEST", uuid.uuid4().hex
    marker = f"{key}={value}"
    env = {k: v for k, v in os.environ.items() if k != "FLWR_LOG_LEVEL"}
    env.update({
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p),
        key: value,
    })

    before = processes()
    log = tmp_path / "output.txt"
    with log.open("w") as f:  # a file, not a pipe: a leftover process holding the pipe would delay the check
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    after = processes()
    output = log.read_text(errors="replace")

    assert p.returncode == 0, output[-5000:]
    assert (tmp_path / "out" / "summary.json").exists(), output[-5000:]

    # 1. every record printed by one handler only: the same message twice in a row (one line per handler)
    # is a duplicate. Empty messages (Flower's spacer lines) are left out; equal messages that are not
    # adjacent (the same metrics in two rounds) are legitimate.
    records = [r for r in log_records(output) if r[2]]
    assert records, f"no log line recognised; format changed?\n{output[-3000:]}"
    dups = [a for a, b in zip(records, records[1:]) if a == b]
    assert not dups, f"log lines printed twice: {dups[:5]}\n{output[-3000:]}"
    assert not any(re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) flwr: ", line) for line in output.splitlines()), \
        "Flower's records also reach the root logger's handler"

    # 2. nothing the command started still running: processes new since `before` (by pid), alive (not a
    # zombie) and its own, by the marker or the session. Not by name alone: other work on the machine may
    # run Ray or Flower meanwhile.
    ours = {
        pid: args for pid, (stat, args) in after.items()
        if pid not in before and not stat.startswith("Z") and (carries(pid, marker) or session_of(pid) == p.pid)
    }
    still = processes()
    left = {pid: args for pid, args in ours.items() if pid in still and not still[pid][0].startswith("Z")}
    for pid in left:  # fail, but leave nothing behind ourselves either
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "processes left behind: " + "; ".join(
        f"{pid} {'(flwr/ray) ' if PROCESS.search(args) else ''}{args[:120]}" for pid, args in left.items())

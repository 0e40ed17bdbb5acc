"""A SuperNode's long-lived node worker: torch, the model and the partition stay in memory between
rounds.

Why: Flower 1.42 runs every message of a deployment in a fresh ``flwr-clientapp`` process. Importing
torch and loading the experiment there (even from the node's disk cache) cost 3-4 s per message on the
default experiment, more for a foundation model. The deployment ClientApp
(:mod:`deltamask.engines.flower.client_app`) therefore imports no torch: it forwards the downlink
bytes and the client's cache to this worker over a unix socket and returns what the worker answers.

Life cycle:

* the first ClientApp process of a SuperNode starts the worker (``python -m
  deltamask.engines.flower.worker``) under a file lock, so concurrent messages start one worker;
* the worker watches an *anchor* process, the SuperNode (found through the ClientApp's parent, the
  SuperNode's ``flower-superexec``), and exits within a second of it (a zombie counts as gone); it
  stays in the SuperNode's process group, so stopping that group stops it too; it also exits after
  ``$DELTAMASK_WORKER_IDLE`` seconds without a request (default 3600);
* one worker per anchor: socket ``$DELTAMASK_WORKER_DIR/node-<anchor pid>.sock`` (default folder
  ``$XDG_RUNTIME_DIR/deltamask`` or ``/tmp/deltamask-<uid>``, mode 0700), its log beside it
  (``.log``); a restarted SuperNode gets a new worker;
* the folder is trusted only if it is a real directory (not a symlink) owned by this user with mode 0700:
  in a shared ``/tmp`` another local user could otherwise pre-create it and plant a socket that the
  ClientApp would send downlinks to and take replies from, or symlink the log or lock somewhere else.
  Anything else is refused with :class:`WorkerError` saying how to fix it; the log and the lock are opened
  without following symlinks;
* requests are served one at a time (one client per node); a worker that dies mid-request makes that
  client fail with the log's last lines, and the next message starts a new worker.

The client's cache still lives in Flower's ``context.state`` and travels with each request, so the
worker holds nothing that a restart would lose except what it can rebuild (the experiment).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .wire import WireError, recv_frame, send_frame

WORKER_DIR_ENV = "DELTAMASK_WORKER_DIR"
IDLE_ENV = "DELTAMASK_WORKER_IDLE"
#: the anchor's pid when it is not the ClientApp's parent (tests; embedding the ClientApp elsewhere)
ANCHOR_ENV = "DELTAMASK_WORKER_ANCHOR"
#: seconds a ClientApp waits for a new worker to import torch and listen
START_TIMEOUT = float(os.environ.get("DELTAMASK_WORKER_START_TIMEOUT", "300"))
PROTOCOL = 1

log = logging.getLogger("deltamask.worker")


class WorkerError(RuntimeError):
    """The node worker could not be started, died while computing, or its update failed; the message says
    why, and ``kind`` is the update's failure kind (``stale-cache`` passes through the worker)."""

    def __init__(self, msg: str, kind: str = "error") -> None:
        super().__init__(msg)
        self.kind = kind


def worker_dir() -> Path:
    """The worker's runtime folder, created mode 0700 if missing and checked (:func:`check_private_dir`)."""
    spec = os.environ.get(WORKER_DIR_ENV)
    if spec:
        d = Path(spec)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "deltamask"
    else:
        d = Path(tempfile.gettempdir()) / f"deltamask-{os.getuid()}"
    try:
        d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise WorkerError(f"cannot create the node worker's folder {d}: {e}; set ${WORKER_DIR_ENV} to a private folder") from None
    check_private_dir(d)
    return d


def check_private_dir(d: Path) -> None:
    """``d`` must be a directory (not a symlink to one), owned by this user, with no access for group or
    others; else :class:`WorkerError` names what is wrong and how to fix it."""
    import stat

    try:
        st = os.lstat(d)
    except OSError as e:
        raise WorkerError(f"the node worker's folder {d} cannot be read: {e}") from None
    fix = f"remove it if it is yours and stale, or set ${WORKER_DIR_ENV} to a private folder (mode 0700, owned by you)"
    if stat.S_ISLNK(st.st_mode):
        raise WorkerError(f"the node worker's folder {d} is a symlink (to {os.readlink(d)!r}), not a directory: refused; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise WorkerError(f"the node worker's folder {d} is not a directory: refused; {fix}")
    if st.st_uid != os.getuid():
        raise WorkerError(f"the node worker's folder {d} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                          f"another user could plant a socket there; refused; {fix}")
    if st.st_mode & 0o077:
        raise WorkerError(f"the node worker's folder {d} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can use it; "
                          f"refused; make it private (chmod 700 {d}) or {fix}")


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` a file in the worker's folder without following a symlink (mode 0600 when created)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        import errno

        if e.errno == errno.ELOOP:
            raise WorkerError(f"{path} is a symlink: refused (the node worker's files are never followed elsewhere); remove it") from None
        raise WorkerError(f"cannot open {path}: {e}") from None


def socket_path(anchor: int) -> Path:
    return worker_dir() / f"node-{anchor}.sock"


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def default_anchor() -> int:
    """The SuperNode's pid: the ``--parent-pid`` of this process's parent when that is the SuperNode's
    ``flower-superexec`` (Flower 1.42: SuperNode -> flower-superexec -> flwr-clientapp), else the parent's."""
    ppid = os.getppid()
    try:
        cmd = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ppid
    if any(c.endswith("flower-superexec") for c in cmd) and "--parent-pid" in cmd:
        i = cmd.index("--parent-pid")
        if i + 1 < len(cmd) and cmd[i + 1].isdigit():
            return int(cmd[i + 1])
    return ppid


def _tail(path: Path, n: int = 1500) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return "(no log)"
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, os.fstat(fd).st_size - n))
        return f.read().decode(errors="replace")


# --- the ClientApp side (standard library only) ------------------------------------------------------
class WorkerClient:
    """Talks to the node worker anchored at ``anchor`` (default: ``$DELTAMASK_WORKER_ANCHOR``, else
    :func:`default_anchor`, the SuperNode), starting it when none listens."""

    def __init__(self, anchor: int | None = None) -> None:
        if anchor is None:
            anchor = int(os.environ.get(ANCHOR_ENV) or default_anchor())
        self.anchor = anchor
        self.path = socket_path(self.anchor)

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None

    def _start(self) -> socket.socket:
        logf = self.path.with_suffix(".log")
        cmd = [sys.executable, "-m", "deltamask.engines.flower.worker", "--socket", str(self.path), "--anchor", str(self.anchor)]
        with os.fdopen(_open_private(logf, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True)
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise WorkerError(f"the node worker exited with code {proc.returncode} while starting; its log {logf} ends:\n{_tail(logf)}")
            s = self._connect()
            if s is not None:
                return s
            if time.time() > deadline:
                proc.kill()
                raise WorkerError(f"the node worker did not listen within {START_TIMEOUT:.0f} s; see {logf}")
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        s = self._connect()
        if s is not None:
            return s
        with os.fdopen(_open_private(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker; the others then connect
            s = self._connect()
            if s is not None:
                return s
            self.path.unlink(missing_ok=True)  # a socket left by a worker that was killed
            return self._start()

    def call(self, header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        s = self.connect()
        try:
            send_frame(s, {**header, "protocol": PROTOCOL}, blobs)
            return recv_frame(s)
        except (WireError, OSError) as e:
            raise WorkerError(
                f"the node worker died while computing ({e}); the next message starts a new one. "
                f"Its log {self.path.with_suffix('.log')} ends:\n{_tail(self.path.with_suffix('.log'))}"
            ) from None
        finally:
            s.close()


# --- the worker process -----------------------------------------------------------------------------
def _handle(header: dict[str, Any], blobs: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
    from .client_work import client_train
    from .node import node_config_of, node_partition
    from .records import split_state
    from .wire import pack_arrays, unpack_arrays

    op = header.get("op")
    if header.get("protocol") != PROTOCOL:
        raise WorkerError(f"ClientApp speaks protocol {header.get('protocol')}, this worker {PROTOCOL}: restart the SuperNode")
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}, {}
    if op != "train":
        raise WorkerError(f"unknown request {op!r}")
    cfg = node_config_of(header["run_config"], header["node_config"], header.get("defaults"))
    pid = node_partition(header["node_config"], cfg)
    state = dict(header.get("state_scalars") or {})
    state.update(unpack_arrays(header.get("state_arrays") or {}, blobs, "state/"))
    res = client_train(cfg, pid, header["node_config"], blobs["payload"], int(header["round"]), state)
    arrays, scalars = split_state(res.state)
    spec, out_blobs = pack_arrays(arrays, "state/")
    out_blobs["payload"] = res.payload
    return {
        "ok": True, "pid": os.getpid(), "stype": res.stype, "num_samples": res.num_samples, "metrics": res.metrics,
        "seconds": res.seconds, "state_scalars": scalars, "state_arrays": spec,
    }, out_blobs


def serve(path: Path, anchor: int, idle_timeout: float) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{os.getpid()}] %(message)s")
    born = _start_time(anchor)
    if born is None:
        log.info("anchor process %d is gone; not starting", anchor)
        return
    check_private_dir(path.parent)
    from . import client_work  # noqa: F401  - torch and deltamask, before listening: a connect means ready

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    srv.bind(str(tmp))
    os.chmod(tmp, 0o600)
    srv.listen(8)
    os.replace(tmp, path)  # appears atomically, already listening
    ino = os.stat(path).st_ino
    busy = threading.Lock()
    last = [time.time()]

    def leave(why: str) -> None:
        log.info("exiting: %s", why)
        try:
            if os.stat(path).st_ino == ino:  # still ours
                path.unlink()
        except OSError:
            pass
        os._exit(0)

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if _start_time(anchor) != born:
                leave(f"anchor process {anchor} (the SuperNode's) is gone")
            if idle_timeout > 0 and not busy.locked() and time.time() - last[0] > idle_timeout:
                leave(f"idle for {idle_timeout:.0f} s")

    signal.signal(signal.SIGTERM, lambda *_: leave("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: leave("SIGINT"))
    threading.Thread(target=watchdog, daemon=True).start()
    log.info("serving on %s for anchor %d", path, anchor)
    served = 0
    while True:
        conn, _ = srv.accept()
        with busy, conn:
            try:
                header, blobs = recv_frame(conn)
                try:
                    reply, out = _handle(header, blobs)
                except Exception as e:  # noqa: BLE001 - the client fails with this reason; the worker lives on
                    from ...errors import failure_kind

                    reply, out = {"ok": False, "error": f"{type(e).__name__}: {e}", "kind": failure_kind(e)}, {}
                send_frame(conn, reply, out)
                served += 1
                log.info("request %d (%s): %s", served, header.get("op"), "ok" if reply.get("ok") else reply.get("error"))
            except (WireError, OSError) as e:  # the ClientApp went away mid-request
                log.info("request dropped: %s", e)
            last[0] = time.time()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="deltamask node worker (started by the deployment ClientApp)")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--anchor", required=True, type=int, help="exit when this process (the SuperNode's) is gone")
    ap.add_argument("--idle-timeout", type=float, default=float(os.environ.get(IDLE_ENV, "3600")))
    a = ap.parse_args(argv)
    serve(a.socket, a.anchor, a.idle_timeout)


if __name__ == "__main__":
    main()

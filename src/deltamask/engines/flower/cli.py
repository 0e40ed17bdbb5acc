"""``deltamask flower ...``: the Flower engine from the deltamask command (wired by ``cli.py``).

    deltamask flower simulate [--config FILE.toml] [--set k=v ...] [--out DIR]   Flower's run_simulation
    deltamask flower run-config [--config FILE.toml] [--set k=v ...]            a kebab-case TOML for
                                                                                `flwr run --run-config`
    deltamask flower check-config FILE.toml                                     names an unknown key or bad
                                                                                value (flwr run does not)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ...config import from_sources
from .settings import FLOWER_KEYS


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def cmd_run_config(args: argparse.Namespace) -> int:
    cfg, engine = from_sources(args.config, args.set, with_engine=True)
    if args.out:
        engine["out_dir"] = str(Path(args.out).resolve())  # the ServerApp needs an absolute path
    lines = [f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in engine.items()]
    lines += [f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in cfg.to_dict().items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


#: Ray, the simulation's backend, on loopback only and without a dashboard. Ray turns 127.0.0.1 given as
#: ``_node_ip_address`` back into the machine's address unless its "cluster mode" is off
#: (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS/Windows); with it off the node's address is
#: 127.0.0.1, and GCS, raylet, workers and agents all listen there only.
_RAY_INIT_ARGS = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
_PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def _ray_on_loopback() -> Iterator[None]:
    """Make the local Ray session started inside bind to 127.0.0.1 (Ray's processes inherit the variable);
    the variable (and Ray's copy of it, where Ray was imported already) is put back afterwards."""
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    env_before = os.environ.get(key)
    consts = sys.modules.get("ray._private.ray_constants")  # imported already: Ray read the variable then
    const_before = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    os.environ[key] = "0"
    if const_before is not None:
        consts.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if env_before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = env_before
        if const_before is not None:
            consts.ENABLE_RAY_CLUSTER = const_before


@contextlib.contextmanager
def _flwr_logs_once() -> Iterator[None]:
    """Flower's logger has its own console handler; stop its records from also reaching the root handler
    (``logging.basicConfig`` in ``deltamask.app.cli.main``), which printed every Flower line twice."""
    flwr_log = logging.getLogger("flwr")
    before = flwr_log.propagate
    flwr_log.propagate = False
    try:
        yield
    finally:
        flwr_log.propagate = before


def _set_subreaper(on: bool) -> bool:
    """Linux: adopt orphaned descendants (Ray's workers outlive their raylet for a moment), so that they can
    be waited for. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> set[int]:
    """This process's child pids (Linux /proc; empty elsewhere)."""
    pids: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _reap(keep: set[int], timeout: float) -> None:
    """Wait up to ``timeout`` s until this process has no children but ``keep`` (adopted orphans included,
    found anew each pass), then SIGKILL the rest and reap them."""
    deadline = time.monotonic() + timeout
    killed = False
    while left := _children() - keep:
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            if killed:
                return
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5.0
        time.sleep(0.05)


@contextlib.contextmanager
def _no_processes_left(timeout: float = 20.0) -> Iterator[None]:
    """Shut Ray down when the simulation ends (also on errors and Ctrl-C), and wait for every process it
    started (GCS, raylet, agents, workers) to be gone before returning."""
    before = _children()
    subreaper = _set_subreaper(True)
    try:
        yield
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception as e:  # noqa: BLE001  (cleanup must not hide the run's own error)
            print(f"deltamask: warning: ray.shutdown failed: {e}", file=sys.stderr)
        if subreaper:
            _reap(before, timeout)
            _set_subreaper(False)


def cmd_simulate(args: argparse.Namespace) -> int:
    from flwr.simulation import run_simulation  # imports Ray only once a simulation starts

    from ...run.round import prepare_out, run_target
    from ...run.tracking import require as require_tracking
    from .client_app import make_client_app
    from .server_app import make_server_app

    cfg, out, overwrite, engine = run_target(args.config, args.set, args.out, args.resume, args.overwrite, "runs/flower")
    out = out.resolve()
    require_tracking(cfg)  # a missing tracker library is said before Ray starts
    if not args.resume and not overwrite:
        prepare_out(out, overwrite=False)  # refuse a folder holding a run before Ray starts
    timeout = args.round_timeout if args.round_timeout is not None else engine.get("round_timeout", FLOWER_KEYS["round-timeout"][0])
    defaults = {**cfg.to_dict(), "out-dir": str(out), "round-timeout": timeout, "resume": bool(args.resume), "overwrite": overwrite}
    if cfg.tracking_dir:  # the ServerApp takes absolute folders only (below --out, its output root here)
        defaults["tracking_dir"] = str(Path(cfg.tracking_dir).expanduser().resolve())
    stale = out / "summary.json"
    started = time.time()
    backend = {
        "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": args.gpus_per_client},
        "init_args": dict(_RAY_INIT_ARGS),
    }
    with _ray_on_loopback(), _no_processes_left(), _flwr_logs_once():
        run_simulation(
            make_server_app(defaults, out_root=out),  # the local user's own --out: the root is that folder
            make_client_app(defaults),
            num_supernodes=cfg.num_clients,
            backend_config=backend,
            verbose_logging=bool(getattr(args, "verbose", False)),
        )
    # run_simulation logs a failing ServerApp but does not raise: the run's own summary says how it ended
    if not stale.is_file() or stale.stat().st_mtime < started:
        print(f"deltamask: run failed: the ServerApp wrote no summary in {out} (its error is in the log above)", file=sys.stderr)
        return 1
    summary = json.loads(stale.read_text())
    if summary.get("status") != "completed":
        print(f"deltamask: run failed: {summary.get('failure', 'see the log above')} ({out})", file=sys.stderr)
        return 1
    print(f"flower simulation finished -> {out}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Flower 1.42's ``flwr run`` answers an unknown ``--run-config`` key with only "Invalid run
    configuration" (the key is in the SuperLink's log); this names it, and checks types and values too."""
    from ...config import load_toml
    from .settings import resolve

    cfg, settings = resolve(load_toml(args.file))
    if settings.out_dir:
        from .settings import out_dir_of

        out_dir_of(settings, None, root="/")  # a relative out-dir is an error here too (the root is the server's to check)
    print(f"{args.file}: valid ({cfg.method} on {cfg.model} / {cfg.dataset}, {cfg.rounds} rounds, {cfg.num_clients} clients)")
    return 0


def cmd_secure_files(args: argparse.Namespace) -> int:
    """The files of docs/flower.md's secure deployment (offline; Flower has no such command)."""
    from ...config import ConfigError
    from .secure import SecureFilesError, secure_files

    try:
        made = secure_files(args.dir, args.nodes, args.host, listen=args.listen, superlink=args.superlink)
    except SecureFilesError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {len(made)} files to {args.dir}:")
    for name, path in made.items():
        print(f"  {name:20s} {path}")
    print("next: docs/flower.md, 'Secure deployment' (register each nodes/node-I.pub with flwr supernode register)")
    return 0


def add_flower_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("flower", help="run on Flower (simulation) or write a run-config for `flwr run`")
    sub = p.add_subparsers(dest="flower_command", required=True)

    s = sub.add_parser("simulate", help="run an experiment through Flower's simulation runtime (Ray), one SuperNode per client")
    s.add_argument("--config", help="TOML preset (see configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--out", default=None, help="output folder (default: the preset's out-dir, else runs/flower); a folder holding a run is refused")
    s.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (ends exactly as an uninterrupted run)")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    s.add_argument("--round-timeout", type=float, default=None,
                   help=f"seconds to wait for a round's replies (default: the preset's round-timeout, else {FLOWER_KEYS['round-timeout'][0]:g})")
    s.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per simulated client (also its torch threads)")
    s.add_argument("--gpus-per-client", type=float, default=0.0, help="Ray GPUs per simulated client (e.g. 0.25)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run-config", help="print a preset as a kebab-case TOML for `flwr run --run-config FILE`")
    r.add_argument("--config", help="TOML preset (snake_case or kebab-case keys)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--out", default=None, help="also set out-dir (made absolute)")
    r.set_defaults(func=cmd_run_config)

    c = sub.add_parser("check-config", help="check a `flwr run --run-config` TOML: names an unknown key or a bad value (flwr run does not)")
    c.add_argument("file", help="the run-config TOML (kebab-case or snake_case keys)")
    c.set_defaults(func=cmd_check_config)

    f = sub.add_parser("secure-files", help="make a secure deployment's files: CA, SuperLink certificate, node keys, "
                                            "SuperExec secrets, a Fleet-only nginx proxy (docs/flower.md)")
    f.add_argument("dir", help="a new folder (mode 0700) for the files; existing files are never overwritten")
    f.add_argument("--nodes", type=int, required=True, help="how many SuperNode key pairs to make")
    f.add_argument("--host", action="append", help="a name or address the SuperLink certificate is valid for "
                   "(repeatable; 127.0.0.1, ::1 and localhost are always added)")
    f.add_argument("--listen", default="0.0.0.0:9092", help="HOST:PORT the proxy serves the nodes on (default 0.0.0.0:9092)")
    f.add_argument("--superlink", default="127.0.0.1:9093",
                   help="HOST:PORT of the SuperLink, on loopback (default 127.0.0.1:9093: flower-superlink --host 127.0.0.1 --port 9093)")
    f.set_defaults(func=cmd_secure_files)

"""``deltamask flower ...``: the Flower engine from the deltamask command (wired by ``cli.py``).

    deltamask flower simulate [--config FILE.toml] [--set k=v ...] [--out DIR]   Flower's run_simulation
    deltamask flower run-config [--config FILE.toml] [--set k=v ...]            a kebab-case TOML for
                                                                                `flwr run --run-config`
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ...config import from_sources
from .settings import FLOWER_KEYS


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def cmd_run_config(args: argparse.Namespace) -> int:
    cfg = from_sources(args.config, args.set)
    lines = [f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in cfg.to_dict().items()]
    if args.out:
        lines.insert(0, f"out-dir = {_toml_value(args.out)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from flwr.simulation import run_simulation

    from .client_app import make_client_app
    from .server_app import make_server_app

    cfg = from_sources(args.config, args.set)
    defaults = {**cfg.to_dict(), "out-dir": args.out, "round-timeout": args.round_timeout}
    backend = {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": args.gpus_per_client}}
    run_simulation(make_server_app(defaults), make_client_app(defaults), num_supernodes=cfg.num_clients, backend_config=backend)
    print(f"flower simulation finished -> {args.out}")
    return 0


def add_flower_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("flower", help="run on Flower (simulation) or write a run-config for `flwr run`")
    sub = p.add_subparsers(dest="flower_command", required=True)

    s = sub.add_parser("simulate", help="run an experiment through Flower's simulation runtime (Ray), one SuperNode per client")
    s.add_argument("--config", help="TOML preset (see configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--out", default="runs/flower", help="output folder (default: runs/flower)")
    s.add_argument("--round-timeout", type=float, default=FLOWER_KEYS["round-timeout"][0], help="seconds to wait for a round's replies")
    s.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per simulated client (also its torch threads)")
    s.add_argument("--gpus-per-client", type=float, default=0.0, help="Ray GPUs per simulated client (e.g. 0.25)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run-config", help="print a preset as a kebab-case TOML for `flwr run --run-config FILE`")
    r.add_argument("--config", help="TOML preset (snake_case or kebab-case keys)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--out", default=None, help="also set out-dir (use an absolute path)")
    r.set_defaults(func=cmd_run_config)

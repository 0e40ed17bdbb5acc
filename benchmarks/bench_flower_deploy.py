"""Seconds per round: local engine vs ``deltamask flower simulate`` vs a real deployment, side by side.

Same preset for all (the test suite's tiny digits config, ``num-clients`` = ``clients-per-round`` so
every node trains every round). The deployment is a SuperLink and one SuperNode per client on 127.0.0.1,
each node with its own disk cache (``cache-dir``), the app submitted with ``flwr run``; it runs twice,
with the node worker (the default) and with ``worker=off`` (every message computes in its own
``flwr-clientapp`` process, reading the node's disk cache). Beside them, on the same federation, Flower's
own floor: ``benchmarks/flower_floor``, an app whose ClientApp answers an empty message at once.
Reported: the median of the per-round ``seconds`` (round 1 excluded: it builds the node caches, starts
the workers and warms Ray), the ratios, and the node caches' hit/build counts.

    python benchmarks/bench_flower_deploy.py [--rounds 6] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "flower")]

from dmtest import TINY  # noqa: E402
from test_flower_deploy import Federation  # noqa: E402

from deltamask.engines.local import run_local  # noqa: E402
from deltamask.config import build_config  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from deltamask.engines.flower.node_cache import cache_counts  # noqa: E402


def per_round(out: Path) -> list[float]:
    return [r["seconds"] for r in read_jsonl(out / "metrics.jsonl")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args()
    keys = {**TINY, "rounds": args.rounds, "num_clients": args.clients, "clients_per_round": args.clients}
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-flower-"))
    res: dict[str, list[float]] = {}

    t = time.time()
    run_local(build_config(keys), tmp / "local")
    res["local"] = per_round(tmp / "local")
    print(f"local done in {time.time() - t:.0f}s", flush=True)

    t = time.time()
    sets = [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "deltamask.app.cli", "flower", "simulate", "--out", str(tmp / "sim"), *sets],
                   check=True, capture_output=True)
    res["simulate"] = per_round(tmp / "sim")
    print(f"simulate done in {time.time() - t:.0f}s", flush=True)

    for worker in ("on", "off"):
        t = time.time()
        name = "deployment" if worker == "on" else "deployment worker=off"
        (tmp / name).mkdir()
        fed = Federation(tmp / name, [f"partition-id={i} num-partitions={args.clients} cache-dir='{tmp / name / f'cache{i}'}' worker='{worker}'"
                                      for i in range(args.clients)])
        try:
            fed.start()
            rc = {k.replace("_", "-"): v for k, v in keys.items()}
            rc.update({"out-dir": str(tmp / name / "out"), "round-timeout": 300.0})
            info = fed.wait(fed.submit(rc), timeout=1200)
            assert info["status"] == "finished:completed", info
            res[name] = per_round(tmp / name / "out")
            if worker == "on":  # Flower's floor on the same federation
                floor = {"rounds": args.rounds, "nodes": args.clients, "out": str(tmp / "floor.json")}
                info = fed.wait(fed.submit(floor, app=ROOT / "benchmarks" / "flower_floor"), timeout=600)
                assert info["status"] == "finished:completed", info
                res["flower floor (empty app)"] = json.loads((tmp / "floor.json").read_text())
        finally:
            fed.stop()
        print(f"{name} done in {time.time() - t:.0f}s", flush=True)

    med = {k: statistics.median(v[1:]) for k, v in res.items()}
    print(json.dumps({"machine": f"{platform.node()} {platform.processor() or platform.machine()}", "date": time.strftime("%Y-%m-%d"),
                      "rounds": args.rounds, "clients": args.clients, "per_round_seconds": res,
                      "median_after_round_1": med,
                      "deployment_over_simulate": med["deployment"] / med["simulate"],
                      "deployment_over_floor": med["deployment"] / med["flower floor (empty app)"],
                      "worker_off_over_on": med["deployment worker=off"] / med["deployment"],
                      "simulate_over_local": med["simulate"] / med["local"],
                      "node_cache": {f"{name} node{i}": cache_counts(tmp / name / f"cache{i}")
                                     for name in ("deployment", "deployment worker=off") for i in range(args.clients)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory and time of a run against training-set size (issue 11, item 4).

``python benchmarks/bench_memory.py [--config configs/dinov2-fmnist.toml] [--sizes 2000 10000 0]
[--settings default budget fp16] [--rounds 2] [--budget-mb 256] [--out benchmarks/out/memory] [--append]``

Each (size, setting) point runs ``run_local`` on the preset in a *fresh* Python process (so peak RSS is
that run's alone): ``train_samples`` = size (0 = the whole training set), ``rounds`` rounds with one head
warm-up round first (so the last round is a mask round), no progress lines. The child reports its own peak
RSS (``VmHWM`` from /proc, = ``ru_maxrss`` of RUSAGE_SELF), the setup seconds (model, data, prefix cache)
and each round's seconds from ``metrics.jsonl``. Settings:

``default``  float32 prefix cache in RAM, no budget (today's behaviour)
``budget``   ``cache_ram_mb=BUDGET`` (``prefix_cache=auto``: on disk when the cache would not fit)
``fp16``     ``cache_dtype=float16`` in RAM, no budget

Writes ``memory.json`` (every point, with ``deltamask.app.machine.machine_info()``) and ``memory.md`` (a table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltamask.app.machine import machine_info  # noqa: E402

SETTINGS = {
    "default": {},
    "budget": {"cache_ram_mb": None},  # filled with --budget-mb
    "fp16": {"cache_dtype": "float16"},
}

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {src!r})
from deltamask.config import from_sources
from deltamask.engines.local import run_local
from deltamask.run.experiment import build_experiment
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
cfg = from_sources({config!r}, {sets!r})
t0 = time.time()
exp = build_experiment(cfg)
setup = time.time() - t0
setup_hwm = hwm()
info = exp.describe()
run_local(cfg, {out!r}, experiment=exp)
recs = [json.loads(l) for l in open({out!r} + "/metrics.jsonl")]
print("RESULT " + json.dumps({{
    "setup_seconds": setup,
    "round_seconds": [r["seconds"] for r in recs],
    "round_images": [sum(info["client_sizes"][c] for c in r["selected"]) for r in recs],
    "phases": [r.get("phase") for r in recs],
    "final_accuracy": recs[-1].get("accuracy"),
    "num_train": info["num_train"],
    "num_test": info["num_test"],
    "prefix_cache": info["prefix_cache"],
    "cache_dtype": info["cache_dtype"],
    "peak_rss_bytes": hwm(),
    "peak_rss_setup_bytes": setup_hwm,
}}))
"""


def run_point(config: str, size: int, setting: dict, rounds: int, workdir: Path) -> dict:
    sets = {"train_samples": size, "rounds": rounds, "head_warmup_rounds": 1, "progress": "false", **setting}
    out = tempfile.mkdtemp(dir=workdir)
    code = _CHILD.format(src=str(ROOT / "src"), config=config, sets=[f"{k}={v}" for k, v in sets.items()], out=out)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.time() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"point {sets} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][7:])
    res.update(sets=sets, wall_seconds=wall)
    return res


def table(points: list[dict], machine: dict) -> str:
    head = (
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, load {machine['loadavg_1m']:.2f} at start; "
        f"{machine['date']}\n\n"
        "| train images | setting | cache | peak RSS (MB): setup, whole run | setup s (prefix cache) | s/round (head, mask) | "
        "ms/image (setup) | ms/image (mask round, its clients' images) | accuracy |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for p in sorted(points, key=lambda p: (p["num_train"], p["setting"])):
        rs = p["round_seconds"]
        rows.append(
            f"| {p['num_train']:,} | {p['setting']} | {p['prefix_cache']} {p['cache_dtype']} | {p['peak_rss_setup_bytes'] / 2**20:,.0f}, {p['peak_rss_bytes'] / 2**20:,.0f} | "
            f"{p['setup_seconds']:.1f} | {', '.join(f'{s:.1f}' for s in rs)} | "
            f"{1000 * p['setup_seconds'] / (p['num_train'] + p['num_test']):.2f} | {1000 * rs[-1] / p['round_images'][-1]:.2f} | "
            f"{p['final_accuracy']:.3f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "dinov2-fmnist.toml"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 0])
    ap.add_argument("--settings", nargs="+", default=["default", "budget"], choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-mb", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "memory"))
    ap.add_argument("--append", action="store_true", help="add to the points already in OUT/memory.json (e.g. 60k in one setting only)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    points = json.loads((out / "memory.json").read_text())["points"] if args.append and (out / "memory.json").is_file() else []
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes:
            for name in args.settings:
                setting = {k: (args.budget_mb if v is None else v) for k, v in SETTINGS[name].items()}
                p = run_point(args.config, size, setting, args.rounds, Path(work))
                p["setting"] = name if name != "budget" else f"budget {args.budget_mb} MB"
                points.append(p)
                print(json.dumps({k: p[k] for k in ("setting", "num_train", "prefix_cache", "peak_rss_bytes", "setup_seconds", "round_seconds")}), flush=True)
                (out / "memory.json").write_text(json.dumps({"machine": machine, "points": points}, indent=1))
    (out / "memory.md").write_text(table(points, machine))
    print(table(points, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 9's ablation: schedules x seeds on one preset, and every downlink policy on the same runs.

    python benchmarks/ablation.py --out runs/ablation                 # the default experiment, 3 seeds
    python benchmarks/ablation.py --out runs/ablation-dinov2 --preset configs/dinov2-fmnist.toml --only today,eps.001
    python benchmarks/ablation.py --out runs/ablation --jobs 8 --set device=cuda    # a GPU machine

Each variant runs with ``downlink=auto``. The downlink policies do not change what is trained (every mode
rebuilds the server's theta exactly; tests/methods/test_downlink.py), so one run gives the bytes of all of them:
each round's ``downlink_candidates`` holds, per client, what a snapshot, the conditional code and the
replay would have cost. Policies: ``old`` (a snapshot to a stale client, nothing to a current one: the
downlink before issue 9), ``snapshot`` (the same, plus the 74-byte digest to a current client), ``cond``,
``replay`` (where admissible, else a snapshot) and ``auto`` (the smallest; what was sent).

Rerunning skips runs whose ``summary.json`` exists. ``--table`` only reads the runs and prints the table
(markdown, means and sample standard deviations over seeds) and writes ``ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: name -> --set overrides (on top of the preset); the order is the table's
VARIANTS: dict[str, list[str]] = {
    "today": ["kappa=0.3", "head_codec=f32"],  # the defaults before issue 9
    "new-default": [],  # the defaults now (kappa=0.1, head_codec=f16, downlink=auto)
    "eps.001": ["eps=0.001"],
    "kappa.1": ["kappa=0.1"],
    "eps.001+kappa.1": ["eps=0.001", "kappa=0.1"],
    "eps.001+theta0.999": ["eps=0.001", "theta0=0.999"],
    "kappa-cosine.5-.1": ["kappa_schedule=cosine", "kappa=0.5", "kappa_min=0.1"],
    "posterior-mean": ["posterior=mean"],
    "reset-never": ["reset_every=0"],
    "reset-5": ["reset_every=5"],
    "head-f16": ["head_codec=f16"],
    "kappa.1+head-f16": ["kappa=0.1", "head_codec=f16"],
    "eps.001+head-f16": ["eps=0.001", "head_codec=f16"],
    "eps.001+kappa.1+head-f16": ["eps=0.001", "kappa=0.1", "head_codec=f16"],
    "paper": ["@configs/paper.toml"],
    "linear-probe": ["method=linear-probe"],
    "linear-probe-f32": ["method=linear-probe", "head_codec=f32"],
    "kappa-rank-logit": ["kappa_rank=logit"],  # on top of the new defaults
    "kappa.1-f32": ["kappa=0.1", "head_codec=f32"],
}
SAME_BITS = 8 * 74  # a theta-delta 'same' message: 40 container bytes + 34 of params
POLICIES = ("old", "snapshot", "cond", "replay", "auto")


def policy_bits(cand: dict, policy: str) -> int:
    if policy == "auto":
        return int(cand["bits"])
    if cand["mode"] == "same":
        return 0 if policy == "old" else SAME_BITS
    if policy in ("cond", "replay") and f"{policy}_bits" in cand:
        return int(cand[f"{policy}_bits"])
    return int(cand["snapshot_bits"])


def run_one(args: argparse.Namespace, name: str, seed: int) -> tuple[str, int, float]:
    out = Path(args.out) / f"{name}-s{seed}"
    if (out / "summary.json").exists():
        return name, seed, 0.0
    sets = [s for s in VARIANTS[name] if not s.startswith("@")]
    preset = next((s[1:] for s in VARIANTS[name] if s.startswith("@")), args.preset)
    cmd = [sys.executable, "-m", "deltamask.app.cli", "run", "--out", str(out), "--overwrite", "--set", f"seed={seed}",
           "--set", "downlink=auto", "--set", "progress=false"]
    if preset:
        cmd += ["--config", preset]
    for s in sets + list(args.set or []):
        cmd += ["--set", s]
    t = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if rc:
        print(f"{name} seed {seed}: exit {rc} (see {out.parent / (out.name + '.log')})", flush=True)
    return name, seed, time.time() - t


def summarize_run(d: Path) -> dict | None:
    sfile, mfile = d / "summary.json", d / "metrics.jsonl"
    if not sfile.exists():
        return None
    s = json.loads(sfile.read_text())
    if s.get("status") != "completed":
        print(f"{d.name}: status {s.get('status')} ({s.get('failure', '')}); left out", file=sys.stderr)
        return None
    recs = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    n = s["num_masked_params"]
    ups = [r["uplink_bpp"] for r in recs]
    res = {"final_accuracy": s["final_accuracy"], "uplink_bpp": sum(ups) / len(ups),
           "uplink_bpp_mask_rounds": s.get("mean_uplink_bpp_mask_rounds"), "kl_floor_bpp": s.get("mean_uplink_kl_floor_bpp"),
           "bound_bpp": s.get("mean_uplink_bound_bpp"), "cond_entropy_bpp": s.get("mean_downlink_cond_entropy_bpp"),
           "wall_seconds": s.get("wall_seconds")}
    for p in POLICIES:
        downs = []
        for r in recs:
            cands = r.get("downlink_candidates") or {}
            sent = sum(int(c["bits"]) for c in cands.values())
            other = r["downlink_bits"] - sent  # the head and anything else that went down
            bits = other + sum(policy_bits(c, p) for c in cands.values())
            downs.append(bits / max(len(r["selected"]), 1) / n)
        res[f"downlink_bpp_{p}"] = sum(downs) / len(downs)
        res[f"total_bpp_{p}"] = res["uplink_bpp"] + res[f"downlink_bpp_{p}"]
    return res


def table(out: Path, names: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for name in names:
        runs = [summarize_run(out / f"{name}-s{s}") for s in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        row: dict = {"name": name, "sets": VARIANTS[name], "seeds": len(runs)}
        for k in runs[0]:
            vals = [r[k] for r in runs if r.get(k) is not None]
            if vals:
                row[k] = statistics.fmean(vals)
                row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| variant | seeds | final accuracy | uplink bpp | KL floor | downlink old | snapshot | cond | replay | auto | "
            "total old | total auto |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        f = lambda k, d=4: f"{r[k]:.{d}f}" if r.get(k) is not None else "-"
        lines.append(f"| {r['name']} | {r['seeds']} | {r['final_accuracy']:.3f} ± {r['final_accuracy_std']:.3f} | {f('uplink_bpp')} | "
                     f"{f('kl_floor_bpp', 5)} | {f('downlink_bpp_old')} | {f('downlink_bpp_snapshot')} | {f('downlink_bpp_cond')} | "
                     f"{f('downlink_bpp_replay')} | {f('downlink_bpp_auto')} | {f('total_bpp_old')} | "
                     f"{r['total_bpp_auto']:.4f} ± {r['total_bpp_auto_std']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", help="TOML preset the variants override (default: the embedded default experiment)")
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    ap.add_argument("--set", action="append", help="extra KEY=VALUE for every run (e.g. device=cuda)")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs present")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if not args.table:
        jobs = [(n, s) for s in seeds for n in names]
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, seed, took in pool.map(lambda j: run_one(args, *j), jobs):
                print(f"{name} seed {seed}: {took:.0f} s", flush=True)
    rows = table(out, names, seeds)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

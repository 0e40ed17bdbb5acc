"""Issue 21's attack benchmark: every attack of the catalogue against DeltaMask, with and without the
robust options, the honest run side by side.

    python benchmarks/bench_attacks.py --out runs/attacks                       # the default experiment
    python benchmarks/bench_attacks.py --out runs/attacks-dinov2 --preset configs/dinov2-fmnist.toml
    python benchmarks/bench_attacks.py --out runs/attacks-digits --set dataset=digits image_size=32 \\
        train_samples=0 test_samples=0 rounds=6 head_warmup_rounds=2 masked_blocks=3   # the quick grid
    python benchmarks/bench_attacks.py --out runs/attacks --table                # only read and tabulate

Every client is selected every round (``clients_per_round = num_clients``, 10 unless ``--set`` says
otherwise) and ``--malicious M`` of them (drawn from the seed, the same ids every round) run an attack of
:data:`deltamask.testing.faults.ATTACKS`, injected exactly where a Flower ClientApp controls the reply (payload,
``num_samples``, metrics) or its data (``label-flip``). Sybil partition claims are the Flower transport's:
``benchmarks/bench_sybil.py`` measures them (tests: ``tests/engines/flower/test_flower_identity.py``). Defenses: ``off`` (no cap, no outlier rule, no clipping, plain mean: the server before
issue 21, less the envelope checks that are always on), ``default`` (the defaults), ``median``
(``robust_mean=median``), ``trimmed`` (``robust_mean=trimmed-mean``) and ``root`` (the opt-in server root set,
``root_samples``: FLTrust's trust scores for the heads; ``--root-samples``, 100 by default).

One in-process experiment per seed is built once (model, data, prefix cache) and reused by every run of
that seed with a fresh method and the head as built, so runs differ only in the attack and the defense.
Each run's summary line goes to ``OUT/runs.jsonl`` (rerunning skips runs already there); ``--table``
prints the markdown table (means and sample standard deviations over seeds) and writes ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFENSES: dict[str, dict[str, object]] = {
    "off": {"max_flip_fraction": 1.0, "flip_outlier": 0.0, "clip_factor": 0.0, "robust_mean": "mean", "max_abs_param": 3e38},
    "default": {},
    "clip3": {"clip_factor": 3.0},  # the default before the margins were measured on a second seed
    "median": {"robust_mean": "median"},
    "trimmed": {"robust_mean": "trimmed-mean"},
    "root": {"root_samples": 100},  # FLTrust against a server root set (--root-samples)
}


def malicious_ids(seed: int, num_clients: int, m: int) -> list[int]:
    import numpy as np

    return sorted(int(c) for c in np.random.default_rng([seed, 2121]).choice(num_clients, size=m, replace=False))


def run_one(exp, head0, cfg, attack: str, bad: list[int], seed: int) -> dict:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    from deltamask.engines.local import run_local
    from deltamask.errors import RunFailed
    from deltamask.testing.faults import Attack
    from deltamask.methods import create_method

    with torch.no_grad():  # every run starts from the head as built (evaluation writes the global head into the net)
        exp.net.head.weight.copy_(head0[0])
        exp.net.head.bias.copy_(head0[1])
    exp.cfg = cfg
    exp.method = create_method(cfg, exp.net)
    fault = None if attack == "none" else (lambda r, c: Attack(attack, seed) if c in bad else None)
    out = tempfile.mkdtemp(prefix="dm-attack-")
    t0 = time.time()
    try:
        s = run_local(cfg, out, fault=fault, experiment=exp)
        status, failure = s["status"], None
    except RunFailed as e:
        status, failure = "failed", str(e)
    wall = time.time() - t0
    recs = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
    rejected = sorted({f["client"] for r in recs for f in r["failures"] if f["kind"] in ("rejected", "malformed")})
    clipped = sorted({c["client"] for r in recs for c in r.get("clients", []) if "clipped" in c or "head_clipped" in c})
    distrusted = sorted({c["client"] for r in recs for c in r.get("clients", []) if "distrusted" in c or "head_distrusted" in c})
    finite = all(np.isfinite(a) for a in accs)
    # each head round's cohort_cos per client (the reported agreement with the round's median head update)
    cohort = [{str(c["client"]): round(c.get("cohort_cos", c.get("head_cohort_cos")), 4) for c in r.get("clients", [])
               if "cohort_cos" in c or "head_cohort_cos" in c} for r in recs]
    return {
        "final_accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
        "trajectory": accs, "status": status, "failure": failure, "rejected": rejected, "clipped": clipped,
        "distrusted": distrusted,
        "round_seconds": statistics.median(r["seconds"] for r in recs) if recs else None, "wall": wall,
        "finite": finite, "malicious": bad, "cohort_cos": [x for x in cohort if x],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default=None, help="a config preset (default: the default experiment)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="key=value overrides on top of the preset (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=None, help="default: every attack that applies to deltamask")
    ap.add_argument("--malicious", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--defenses", nargs="+", default=["off", "default"], choices=list(DEFENSES))
    ap.add_argument("--no-honest", action="store_true",
                    help="skip the honest runs (run them in a later call: rows already in runs.jsonl are skipped)")
    ap.add_argument("--root-samples", type=int, default=100, help="the root defense's root_samples (server-held labelled images)")
    ap.add_argument("--table", action="store_true", help="only tabulate OUT/runs.jsonl")
    ap.add_argument("--margins", nargs="+", default=None, metavar="RUN_DIR",
                    help="only read honest runs' metrics.jsonl and print how far their clients stay from the bounds")
    a = ap.parse_args(argv)
    if a.margins:
        print(margins(a.margins))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    if not a.table:
        run_grid(a, log)
    table = tabulate([json.loads(line) for line in open(log)] if log.exists() else [])
    (out / "table.md").write_text(table)
    print(table)
    return 0


def run_grid(a: argparse.Namespace, log: Path) -> None:
    import torch

    from deltamask.config import build_config, from_sources
    from deltamask.run.experiment import build_experiment
    from deltamask.testing.faults import ATTACKS

    attacks = a.attacks or [x for x in ATTACKS if x != "scaled-update"]
    done = {(r["seed"], r["attack"], r["m"], r["defense"]) for r in map(json.loads, open(log))} if log.exists() else set()
    base = from_sources(a.preset, [*a.set, "progress=false"])
    if not any(s.startswith("clients_per_round") for s in a.set):
        base = build_config({"clients_per_round": base.num_clients}, base=base)
    DEFENSES["root"] = {"root_samples": a.root_samples}
    for seed in a.seeds:
        cfg0 = build_config({"seed": seed}, base=base)
        # the root set lies outside every client's data: the clients' tensors are the same with or without it
        exp = build_experiment(build_config(DEFENSES["root"], base=cfg0) if "root" in a.defenses else cfg0)
        head0 = (exp.net.head.weight.detach().clone(), exp.net.head.bias.detach().clone())
        grid = [] if a.no_honest else [("none", 0, d) for d in a.defenses]
        grid += [(att, m, d) for att in attacks for m in a.malicious for d in a.defenses]
        for attack, m, defense in grid:
            if (seed, attack, m, defense) in done:
                continue
            cfg = build_config(DEFENSES[defense], base=cfg0)
            res = run_one(exp, head0, cfg, attack, malicious_ids(seed, cfg.num_clients, m), seed)
            row = {"seed": seed, "attack": attack, "m": m, "defense": defense, "n": cfg.num_clients, **res}
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed} {attack:15s} {m}/{cfg.num_clients} {defense:8s} acc {res['final_accuracy']} {res['status']} "
                  f"rejected {res['rejected']} clipped {res['clipped']} distrusted {res['distrusted']} {res['wall']:.0f}s", file=sys.stderr, flush=True)
        del exp
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def margins(run_dirs: list[str]) -> str:
    """The honest distribution against the bounds: per run, the largest fraction of N a client flipped
    (cap: ``max_flip_fraction``), the largest ratio of a client's flips to the round's median (``flip_outlier``)
    and of a client's head / update norm to the round's median (``clip_factor``), and the largest head entry."""
    import numpy as np

    lines = ["| run | N | rounds | max flips / N | max flips / round median | max update norm / round median (per tensor) | rejected or clipped |",
             "|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        recs = [json.loads(line) for line in open(Path(d) / "metrics.jsonl")]
        summary = json.loads((Path(d) / "summary.json").read_text()) if (Path(d) / "summary.json").exists() else {}
        n = summary.get("num_masked_params")
        frac, fr, nr, hits = 0.0, 0.0, 0.0, 0
        for r in recs:
            cl = r.get("clients") or []
            flips = [c["flips"] for c in cl if "flips" in c]
            for key in ("update_norm", "weight_norm", "bias_norm", "head_weight_norm", "head_bias_norm"):
                norms = [c[key] for c in cl if key in c]
                if len(norms) >= 2 and np.median(norms) > 0:
                    nr = max(nr, max(norms) / float(np.median(norms)))
            if flips:
                if n:
                    frac = max(frac, max(flips) / n)
                if len(flips) >= 3 and np.median(flips) > 0:
                    fr = max(fr, max(flips) / float(np.median(flips)))
            hits += sum(f["kind"] == "rejected" for f in r["failures"]) + sum("clipped" in c or "head_clipped" in c for c in cl)
        lines.append(f"| {d} | {n} | {len(recs)} | {frac:.5f} | {fr:.3f} | {nr:.3f} | {hits} |")
    return "\n".join(lines)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def tabulate(rows: list[dict]) -> str:
    if not rows:
        return "no runs yet\n"
    defenses = [d for d in DEFENSES if any(r["defense"] == d for r in rows)]
    honest = {d: [r["final_accuracy"] for r in rows if r["attack"] == "none" and r["defense"] == d and r["final_accuracy"] is not None] for d in defenses}
    lines = ["| attack | malicious | " + " | ".join(f"{d}: final acc (Δ vs honest) | {d}: failed / non-finite" for d in defenses) + " |",
             "|---|---|" + "---|---|" * len(defenses)]
    keys = []
    for r in rows:
        k = (r["attack"], r["m"], r.get("n", 10))
        if k not in keys:
            keys.append(k)
    for att, m, n in keys:
        cells = []
        for d in defenses:
            sel = [r for r in rows if (r["attack"], r["m"], r["defense"]) == (att, m, d)]
            accs = [r["final_accuracy"] for r in sel if r["final_accuracy"] is not None and r["status"] == "completed"]
            delta = ""
            if accs and honest[d] and att != "none":
                delta = f" ({statistics.mean(accs) - statistics.mean(honest[d]):+.3f})"
            cells.append(_ms(accs) + delta)
            cells.append(f"{sum(r['status'] == 'failed' for r in sel)} / {sum(not r['finite'] for r in sel)} of {len(sel)}")
        lines.append(f"| {att} | {m}/{n} | " + " | ".join(cells) + " |")
    secs = {d: [r["round_seconds"] for r in rows if r["attack"] == "none" and r["defense"] == d] for d in defenses}
    if secs.get("off") and secs.get("default"):
        ratio = statistics.median(secs["default"]) / statistics.median(secs["off"])
        lines.append("")
        lines.append(f"Honest runs, median seconds per round: off {statistics.median(secs['off']):.2f}, default "
                     f"{statistics.median(secs['default']):.2f} (ratio {ratio:.3f}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

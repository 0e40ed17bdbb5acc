"""Skewed clients (issue 25): does a method walk the model downhill on label-skewed splits with few clients
per round? Every run is a fresh ``deltamask run`` process; a run folder with a summary is reused.

    python benchmarks/bench_skew.py --out runs/skew --setup digits                 # the grid, 3 seeds
    python benchmarks/bench_skew.py --out runs/skew --setup digits --table         # the table only
    python benchmarks/bench_skew.py --out runs/skew --setup digits \\
        --variant "paper:kappa=0.1,server_lr=1" --methods deltamask                # an extra DeltaMask variant
    python benchmarks/bench_skew.py --out runs/skew --setup fmnist-dinov2 --splits preset \
        --variant "bal:client_loss=balanced" --methods deltamask,bal               # the preset itself, as shipped

Per run: the per-round trajectory, the accuracy at the end of the head warm-up (round ``head_warmup_rounds``),
the final accuracy, the mean of the last 3 rounds, the best and how far the final falls below it. The table
gives the mean and sample sd over seeds per (split, method); the goal columns check DeltaMask against its own
warm-up (final >= warm-up - 1 point) and against federated linear probing (mean of the last 3 rounds).
Raw rows: ``OUT/rows-SETUP.jsonl`` (one per run, with the trajectory).

Methods: ``deltamask`` is the library's default (``client_loss=auto``: the balanced loss since issue 25),
``deltamask-ce`` plain cross-entropy (the default before; what rows named ``deltamask`` in RESULTS.md's tables
from before that change ran), ``fedpm``, ``linear-probe``, ``fedavg``, and any ``--variant``. A run folder with a
summary is reused only if it ran the same keys and trained with the same loss (``summary.json``'s
``client_loss``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the runs the issue describes: 3 head rounds then 11 mask rounds
COMMON = {"rounds": 14, "head_warmup_rounds": 3, "partition": "dirichlet", "min_partition_size": 10}
SETUPS: dict[str, tuple[str | None, dict[str, object]]] = {
    # sklearn's digits (real, 1,797 images), EfficientNet-Lite0 (pretrained) at 32 px, last 3 blocks
    "digits": (None, {"dataset": "digits", "image_size": 32, "train_samples": 0, "test_samples": 0, "masked_blocks": 3}),
    # the default experiment (EfficientNet-Lite0, Fashion-MNIST at 64 px, 3,000 / 1,000 images, last 5 blocks)
    "fmnist-effnet": ("configs/default.toml", {}),
    # the DINOv2 preset (DINOv2 ViT-S/14, Fashion-MNIST at 56 px, last 3 blocks)
    "fmnist-dinov2": ("configs/dinov2-fmnist.toml", {}),
    # DINOv2 ViT-S/14 on a second real data set: sklearn's digits at 56 px, last 3 blocks
    "digits-dinov2": (None, {"dataset": "digits", "model": "dinov2_small", "image_size": 56, "train_samples": 0,
                             "test_samples": 0, "masked_blocks": 3, "kappa": 0.3, "head_codec": "f32"}),
    # the case, as near as offline data allows: 3 hard classes (Fashion-MNIST's T-shirt/top, Pullover,
    # Shirt; written once to OUT/fmnist3.npz), DINOv2 ViT-S/14 at 56 px, the last 2 blocks masked, the library's
    # defaults otherwise (kappa 0.1, f16 head), 1,500 train / 600 test images
    "fmnist3-dinov2": (None, {"dataset": "npz:{out}/fmnist3.npz", "model": "dinov2_small", "image_size": 56,
                              "train_samples": 1500, "test_samples": 600, "masked_blocks": 2}),
}
FMNIST3 = (0, 2, 6)  # T-shirt/top, Pullover, Shirt


def write_fmnist3(path: Path) -> None:
    """Fashion-MNIST restricted to the 3 classes of ``FMNIST3`` (relabelled 0..2), as an npz data set."""
    import numpy as np

    from deltamask.data.sources import load_dataset

    d = load_dataset("fashion-mnist")
    keep = np.asarray(FMNIST3)

    def sel(x, y):  # type: ignore[no-untyped-def]
        m = np.isin(y, keep)
        return np.asarray(x[m]), np.searchsorted(keep, np.asarray(y)[m]).astype(np.int64)

    x, y = sel(d.x_train, d.y_train)
    xt, yt = sel(d.x_test, d.y_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt, classes=np.array([d.classes[k] for k in FMNIST3]))
#: (name, alpha, clients, per round); "preset" keeps the preset's own split, rounds and warm-up (the issue's goal
#: that the presets' results get no worse: ``--splits preset``)
SPLITS = {"a0.1-3of6": (0.1, 6, 3), "a0.5-3of6": (0.5, 6, 3), "a0.1-5of10": (0.1, 10, 5), "a0.5-5of10": (0.5, 10, 5),
          "preset": None}
METHODS = {
    "deltamask": {"method": "deltamask"},  # the library's default: client_loss=auto, balanced since issue 25
    "deltamask-ce": {"method": "deltamask", "client_loss": "ce"},  # plain cross-entropy (the default before)
    "fedpm": {"method": "fedpm"},
    "linear-probe": {"method": "linear-probe"},
    "fedavg": {"method": "fedavg"},
}


def _sets(d: dict[str, object]) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={v}"]
    return out


def _resolved_loss(cfg: dict[str, object]) -> str:
    """The local loss a config (values as saved, or as ``--set`` strings) trains with in this build
    (``client_loss=auto`` resolves by this build's rule)."""
    from deltamask.config import Config, client_loss_of, parse_bool

    th = cfg.get("train_head", False)
    return client_loss_of(Config(method=str(cfg.get("method", "deltamask")), client_loss=str(cfg.get("client_loss", "auto")),
                                 train_head=th if isinstance(th, bool) else parse_bool(str(th))))


def _resolved_loss_then(summary: dict) -> str:
    """The loss a finished run trained with: its summary's own word, else (runs from before issue 25's
    change of ``auto``) ``auto`` meant balanced only with a joint head."""
    if "client_loss" in summary:
        return str(summary["client_loss"])
    cfg = summary["config"]
    loss = str(cfg.get("client_loss", "auto"))
    if loss != "auto":
        return loss
    return "balanced" if cfg.get("train_head") in (True, "true") else "ce"


def run_one(out: Path, preset: str | None, keys: dict[str, object]) -> dict:
    summary = out / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        same = all(str(s["config"].get(k)) == str(v) or str(v).lower() == str(s["config"].get(k)).lower() for k, v in keys.items())
        # a run kept from before a default changed is reused only if it trained with the loss this run would
        # (rows named "deltamask" before issue 25's change are plain cross-entropy: rerun them as deltamask-ce)
        if s.get("status") == "completed" and same and _resolved_loss_then(s) == _resolved_loss({**s["config"], **keys}):
            return s
    cmd = [sys.executable, "-m", "deltamask.app.cli", "run", "--out", str(out), "--overwrite"]
    if preset:
        cmd += ["--config", str(ROOT / preset)]
    cmd += _sets({**keys, "progress": "false"})
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    print(f"  {out.name}: {time.time() - t0:.0f}s", flush=True)
    return json.loads(summary.read_text())


def row_of(out: Path, summary: dict, setup: str, split: str, name: str, seed: int) -> dict:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    traj = [r.get("accuracy") for r in recs]
    warm = summary["config"]["head_warmup_rounds"]
    accs = [a for a in traj if a is not None]
    return {
        "setup": setup, "split": split, "method": name, "seed": seed,
        "trajectory": traj,
        "density": [r.get("mask_density") for r in recs],
        "warmup_accuracy": traj[warm - 1] if warm >= 1 and len(traj) >= warm else None,
        "final": accs[-1], "last3": statistics.fmean(accs[-3:]), "best": max(accs), "below_best": max(accs) - accs[-1],
        "downhill": summary.get("downhill"),
        "total_bpp": (8 * (summary["total_uplink_bytes"] + summary["total_downlink_bytes"])
                      / summary["num_masked_params"] / summary["config"]["clients_per_round"] / len(recs)) if summary.get("num_masked_params") else None,
        "uplink_bpp": summary.get("mean_uplink_bpp"), "downlink_bpp": summary.get("mean_downlink_bpp"),
    }


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(rows: list[dict]) -> str:
    out = ["| split | method | seeds | warm-up end | final | mean of last 3 | best - final | total bpp | goals (DeltaMask) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    for sp in splits:
        lp = [r for r in rows if r["split"] == sp and r["method"] == "linear-probe"]
        lp_last3 = {r["seed"]: r["last3"] for r in lp}
        for m in dict.fromkeys(r["method"] for r in rows if r["split"] == sp):
            rs = sorted((r for r in rows if r["split"] == sp and r["method"] == m), key=lambda r: r["seed"])
            goal = ""
            if rs and rs[0]["warmup_accuracy"] is not None and m not in ("linear-probe", "fedavg", "fedpm"):
                worst = min(r["final"] - r["warmup_accuracy"] for r in rs)
                g1 = "ok" if worst >= -0.01 else "FAIL"
                g2 = "-"
                if lp_last3:
                    mean_dm = statistics.fmean(r["last3"] for r in rs)
                    mean_lp = statistics.fmean(lp_last3.values())
                    g2 = f"{'ok' if mean_dm >= mean_lp else 'FAIL'} ({mean_dm - mean_lp:+.3f})"
                goal = f"final vs warm-up (worst seed) {worst:+.3f} {g1}; last 3 vs linear probing {g2}"
            out.append(f"| {sp} | {m} | {len(rs)} | {_ms([r['warmup_accuracy'] for r in rs])} | {_ms([r['final'] for r in rs])} | "
                       f"{_ms([r['last3'] for r in rs])} | {_ms([r['below_best'] for r in rs])} | {_ms([r['total_bpp'] for r in rs])} | {goal} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="digits")
    ap.add_argument("--splits", default=",".join(k for k in SPLITS if k != "preset"),
                    help=f"comma-separated, of {list(SPLITS)} (preset = the preset's own size, split and rounds)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)} and the --variant names")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value (a DeltaMask variant; repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value for every run (repeatable)")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs already there")
    args = ap.parse_args(argv)

    methods = dict(METHODS)
    for v in args.variant:
        name, _, kv = v.partition(":")
        methods[name] = {"method": "deltamask", **dict(x.split("=", 1) for x in kv.split(",") if x)}
    extra = dict(x.split("=", 1) for x in args.set)
    preset, setup_keys = SETUPS[args.setup]
    out = Path(args.out).resolve()
    setup_keys = {k: v.format(out=out) if isinstance(v, str) else v for k, v in setup_keys.items()}
    if args.setup == "fmnist3-dinov2" and not (out / "fmnist3.npz").exists():
        write_fmnist3(out / "fmnist3.npz")
    rows = []
    for sp in args.splits.split(","):
        split_keys = {} if SPLITS[sp] is None else {**COMMON, "alpha": SPLITS[sp][0], "num_clients": SPLITS[sp][1],
                                                     "clients_per_round": SPLITS[sp][2]}
        for name in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                d = out / args.setup / sp / f"{name}-s{seed}"
                keys = {**split_keys, **setup_keys, "seed": seed, **methods[name], **extra}
                if args.table:
                    if not (d / "summary.json").exists():
                        continue
                    summary = json.loads((d / "summary.json").read_text())
                else:
                    summary = run_one(d, preset, keys)
                rows.append(row_of(d, summary, args.setup, sp, name, seed))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rows-{args.setup}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

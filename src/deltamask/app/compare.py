"""``deltamask compare``: run a suite of methods on one setup and tabulate accuracy against bits.

A suite is a TOML file::

    title = "optional"
    [base]                 # keys shared by every run (any `deltamask config` key)
    dataset = "fashion-mnist"
    rounds = 10
    [[runs]]               # one table per run: a unique name and the keys that differ
    name = "deltamask"
    method = "deltamask"
    [[runs]]
    name = "fedpm-ans"
    method = "fedpm"
    codec = "bernoulli-ans"

    seeds = [0, 1, 2]      # optional: every run is repeated once per seed (as NAME-sSEED)

Each run goes to ``OUT/runs/NAME`` (``OUT/runs/NAME-sSEED`` with ``seeds``; a normal run folder). The suite is resumable: a run whose
``summary.json`` exists with the same config is skipped, an interrupted one is resumed from its
state, and a finished run whose config changed is an error (delete its folder or rename the run).
Outputs, read back from the runs' files only: ``comparison.csv``, ``comparison.md`` and
``comparison.png`` (final accuracy against mean uplink bpp, log axis, one point per run: the shape of
DeltaMask's Figure 1) and ``comparison-total.png`` (the same against total bits, uplink + downlink: what
a user pays both ways).

With ``seeds``, ``comparison.md`` first gives one row per run with the mean and the sample standard
deviation over its seeds (accuracy claims are means over seeds with their spread), then every seed's
row; the plot shows the means with the accuracy's standard deviation as error bars.

With ``tracking`` set (in ``[base]`` or a run), every member is one tracked run, named after it, in one MLflow
experiment named after the suite's title, and TensorBoard log dirs side by side under ``OUT/tracking/tensorboard``
(:func:`tracked_config`; README "Watch a run"). A member finished before tracking was turned on is skipped as
before, so it is not tracked.

Uplink bpp in the table is the mean over the *training* rounds (after the head warm-up, where the
methods differ); the mean over all rounds and the downlink mean (all rounds) are reported beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, build_config, read_toml
from ..run.metrics import read_jsonl

COLUMNS = (
    "name",
    "method",
    "seed",
    "final_accuracy",
    "best_accuracy",
    "uplink_bpp",
    "uplink_bpp_all_rounds",
    "downlink_bpp",
    "total_bpp",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
    "total_bytes_per_client_round",
    "wall_seconds",
    "rounds",
    "num_masked_params",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def load_suite(path: str | Path) -> tuple[str, list[tuple[str, Config]]]:
    """(title, [(run name, validated config)]) from a suite file; every problem raises ConfigError."""
    title, runs, _ = _read_suite(path)
    return title, runs


def _read_suite(path: str | Path) -> tuple[str, list[tuple[str, Config]], list[int] | None]:
    """:func:`load_suite` plus the suite's ``seeds`` (None when it has none)."""
    p = Path(path)
    data = read_toml(p, "suite file", " (see configs/suites/default.toml)")
    unknown = set(data) - {"title", "base", "runs", "seeds"}
    if unknown:
        raise ConfigError(f"suite file {str(p)!r}: unknown top-level keys {sorted(unknown)}; expected title, seeds, [base], [[runs]]")
    seeds = data.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"suite file {str(p)!r}: seeds must be a list of distinct non-negative integers, e.g. seeds = [0, 1, 2]")
    base = data.get("base", {})
    runs = data.get("runs")
    if not isinstance(base, dict):
        raise ConfigError(f"suite file {str(p)!r}: [base] must be a table of config keys")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"suite file {str(p)!r}: needs at least one [[runs]] table with a name")
    named: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, r in enumerate(runs, 1):
        if not isinstance(r, dict) or "name" not in r:
            raise ConfigError(f"suite file {str(p)!r}: run #{i} has no name")
        name = str(r["name"])
        if not _NAME.match(name):
            raise ConfigError(f"suite file {str(p)!r}: run name {name!r} must be letters, digits, '.', '_', '-' (a folder name)")
        if name in seen:
            raise ConfigError(f"suite file {str(p)!r}: run name {name!r} is used twice")
        seen.add(name)
        keys = {**base, **{k: v for k, v in r.items() if k != "name"}}
        if seeds is not None and "seed" in keys:
            raise ConfigError(f"suite file {str(p)!r}, run {name!r}: 'seed' is set but the suite has seeds = {seeds}; drop one")
        named.append((name, keys))
    out: list[tuple[str, Config]] = []
    # seeds outermost: an interrupted suite has every method at the first seed before any second seed
    for seed in seeds if seeds is not None else [None]:
        for name, keys in named:
            run_keys = keys if seed is None else {**keys, "seed": seed}
            try:
                cfg = build_config(run_keys)
            except ConfigError as e:
                raise ConfigError(f"suite file {str(p)!r}, run {name!r}: {e}") from None
            out.append((name if seed is None else f"{name}-s{seed}", cfg))
    return str(data.get("title", p.stem)), out, seeds


#: the tracking keys: a suite may turn tracking on or off between invocations without orphaning its runs
TRACKING_KEYS = ("tracking", "tracking_dir", "tracking_experiment")


def tracked_config(cfg: Config, out: Path, title: str) -> Config:
    """A member's config with the suite's tracking defaults: a tracked suite logs every member into one
    MLflow experiment named after the suite (``tracking_experiment``) and one root (``tracking_dir`` =
    ``OUT/tracking``: TensorBoard log dirs side by side, ``tracking/tensorboard/NAME``, one MLflow store
    ``tracking/mlruns``); each tracked run is named after its member (``NAME`` or ``NAME-sSEED``)."""
    if cfg.tracking.strip().lower() in ("", "none"):
        return cfg
    return cfg.replace(tracking_dir=cfg.tracking_dir or str((out / "tracking").resolve()),
                       tracking_experiment=cfg.tracking_experiment or title)


def _same_config(saved: dict[str, Any], cfg: Config) -> bool:
    """Same run config, ignoring progress/device. A key the saved config lacks (a run made before the key
    existed) counts as equal when this config leaves it at its default, so adding a config key does not
    orphan finished runs."""
    ignore = {"progress", "device", *TRACKING_KEYS}  # where a run is watched is not what it computed
    defaults = json.loads(json.dumps(Config().to_dict()))
    a = {k: v for k, v in saved.items() if k not in ignore}
    b = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in ignore}
    for k in set(b) - set(a):
        if k in defaults and b[k] == LEGACY_VALUES.get(k, defaults[k]):
            a[k] = b[k]
    return a == b


#: For keys whose default does not reproduce what runs did before the key existed: the value that does.
#: A run saved before issue 9 sent theta as a snapshot, so it matches ``downlink="snapshot"``, not the new
#: default ``auto`` (whose downlink bytes differ; the training is the same).
LEGACY_VALUES: dict[str, Any] = {"downlink": "snapshot"}


def run_one(name: str, cfg: Config, folder: Path, say: Any = print) -> str:
    """Run, resume or skip one run of the suite; returns what was done."""
    from ..engines.local import run_local
    from ..run.state import STATE_FILE

    summary = folder / "summary.json"
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        saved = json.loads(cfg_file.read_text())
        if not _same_config(saved, cfg):
            raise ConfigError(
                f"run {name!r}: {str(folder)!r} holds a run with a different config; delete that folder or rename the run"
            )
        if summary.is_file():
            say(f"[compare] {name}: finished earlier, skipped")
            return "skipped"
        if (folder / STATE_FILE).is_file():
            say(f"[compare] {name}: resuming")
            run_local(cfg, folder, resume=True)
            return "resumed"
    say(f"[compare] {name}: running {cfg.method}")
    run_local(cfg, folder)
    return "ran"


def collect_row(name: str, folder: Path, seed: int | None = None) -> dict[str, Any]:
    """One table row from a finished run's summary.json and metrics.jsonl (``seed``: the suite's
    seed for this run, when the suite repeats runs over seeds)."""
    s = json.loads((folder / "summary.json").read_text())
    recs = read_jsonl(folder / "metrics.jsonl")
    train = [r for r in recs if r.get("phase") != "head"] or recs
    up_train = [r["uplink_bpp"] for r in train if r.get("uplink_bpp") is not None]
    up_b, down_b = int(s.get("total_uplink_bytes", 0)), int(s.get("total_downlink_bytes", 0))
    client_rounds = sum(len(r.get("selected") or []) for r in recs)  # every client a round sends theta to
    return {
        "name": name,
        "method": s.get("method"),
        "seed": seed,
        "final_accuracy": s.get("final_accuracy"),
        "best_accuracy": s.get("best_accuracy"),
        "uplink_bpp": sum(up_train) / len(up_train) if up_train else None,
        "uplink_bpp_all_rounds": s.get("mean_uplink_bpp"),
        "downlink_bpp": s.get("mean_downlink_bpp"),
        "total_bpp": _sum_or_none(s.get("mean_uplink_bpp"), s.get("mean_downlink_bpp")),
        "uplink_bytes": up_b,
        "downlink_bytes": down_b,
        "total_bytes": up_b + down_b,
        "total_bytes_per_client_round": (up_b + down_b) / client_rounds if client_rounds else None,
        "wall_seconds": (s.get("wall_seconds") or 0.0) + (s.get("setup_seconds") or 0.0),
        "rounds": s.get("rounds_completed"),
        "num_masked_params": s.get("num_masked_params"),
    }


def _sum_or_none(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) + float(b)


_SEED_SUFFIX = re.compile(r"^(?P<base>.+)-s(?P<seed>\d+)$")


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run name (seed suffix dropped), the mean of every numeric column over seeds, plus
    ``final_accuracy_std`` / ``best_accuracy_std`` / ``total_bpp_std`` (sample standard deviation;
    0 for a single seed) and ``seeds`` (how many)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        m = _SEED_SUFFIX.match(str(r["name"])) if r.get("seed") is not None else None
        groups.setdefault(m.group("base") if m else str(r["name"]), []).append(r)
    out = []
    for name, rs in groups.items():
        agg: dict[str, Any] = {"name": name, "method": rs[0].get("method"), "seeds": len(rs)}
        for k in COLUMNS:
            if k in ("name", "method", "seed"):
                continue
            vals = [float(r[k]) for r in rs if isinstance(r.get(k), (int, float))]
            agg[k] = sum(vals) / len(vals) if vals and len(vals) == len(rs) else None
        for k in ("final_accuracy", "best_accuracy", "total_bpp"):
            vals = [float(r[k]) for r in rs if isinstance(r.get(k), (int, float))]
            if vals and len(vals) == len(rs):
                mu = sum(vals) / len(vals)
                agg[k + "_std"] = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _fmt(v: Any, key: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key.endswith("accuracy"):
        return f"{v:.4f}"
    if key.endswith("bpp") or key.endswith("bpp_all_rounds"):
        return f"{v:.4g}"
    if key.endswith("bytes") or key.endswith("bytes_per_client_round"):
        return f"{int(round(v)):,}"
    if key == "wall_seconds":
        return f"{v:.0f}"
    return str(v)


def write_outputs(out: Path, title: str, rows: list[dict[str, Any]]) -> list[Path]:
    """comparison.csv, comparison.md and comparison.png from the collected rows."""
    written = []
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    written.append(out / "comparison.csv")
    shown = ("name", "method", "final_accuracy", "best_accuracy", "uplink_bpp", "downlink_bpp", "total_bpp", "total_bytes",
             "total_bytes_per_client_round", "wall_seconds")
    heads = ("run", "method", "final acc", "best acc", "mean uplink bpp (training rounds)", "mean downlink bpp",
             "total bpp (up+down)", "total bytes (up+down)", "bytes per client-round (up+down)", "wall time (s)")
    n = rows[0].get("num_masked_params") if rows else None
    lines = [
        f"# {title}",
        "",
        f"bpp = bits per maskable parameter (N = {n:,}), per client and round, from the real payload bytes." if n else "",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(heads))) + "|",
    ]
    if any(r.get("seed") is not None for r in rows):
        lines[4:4] = _seed_table(aggregate_rows(rows)) + ["", "Every seed:", ""]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k in shown) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    written.append(out / "comparison.md")
    written.append(plot_comparison(out / "comparison.png", title, rows))
    written.append(plot_comparison(out / "comparison-total.png", title, rows, x_key="total_bpp"))
    return written


def _seed_table(agg: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: mean ± sample standard deviation over each run's seeds."""
    heads = ("run", "method", "seeds", "final acc (mean ± sd)", "best acc (mean ± sd)", "uplink bpp (training rounds)",
             "downlink bpp", "total bpp (up+down, all rounds)", "wall time (s, mean)")
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(heads))) + "|"]
    for a in agg:
        pm = [
            "-" if a.get(k) is None else f"{a[k]:.4f} ± {a.get(k + '_std', 0.0):.4f}" for k in ("final_accuracy", "best_accuracy")
        ]
        cells = [a["name"], str(a["method"]), str(a["seeds"]), *pm, _fmt(a.get("uplink_bpp"), "uplink_bpp"),
                 _fmt(a.get("downlink_bpp"), "downlink_bpp"), _fmt(a.get("total_bpp"), "total_bpp"), _fmt(a.get("wall_seconds"), "wall_seconds")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_X_LABELS = {
    "uplink_bpp": "mean uplink bits per parameter (training rounds, log scale)",
    "total_bpp": "mean total bits per parameter, uplink + downlink, per client-round (all rounds, log scale)",
}


def plot_comparison(path: Path, title: str, rows: list[dict[str, Any]], x_key: str = "uplink_bpp") -> Path:
    """Final accuracy against mean uplink bpp (``x_key="total_bpp"``: up + down), log axis, one labelled
    point per run (per run name, mean ± sd, with seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    seeded = any(r.get("seed") is not None for r in rows)
    for r in aggregate_rows(rows) if seeded else rows:
        x, y = r.get(x_key), r.get("final_accuracy")
        if x is None or y is None or x <= 0:
            continue
        star = r.get("method") == "deltamask"
        ax.errorbar([x], [y], yerr=[r.get("final_accuracy_std", 0.0)] if seeded else None, fmt="*" if star else "o",
                    ms=10 if star else 6, capsize=3, zorder=3)
        label = f"{r['name']} (n={r['seeds']})" if seeded else r["name"]
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(_X_LABELS[x_key])
    ax.set_ylabel("final test accuracy" + (" (mean ± sd over seeds)" if seeded else ""))
    ax.grid(alpha=0.3, which="both")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)  # long suite titles must fit the figure
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_suite(suite: str | Path, out_dir: str | Path, only: list[str] | None = None, say: Any = None) -> list[dict[str, Any]]:
    """Run (or resume / skip) every run of a suite, then write the comparison files; returns the rows."""
    log = say or (lambda m: print(m, file=sys.stderr, flush=True))
    title, runs, seeds = _read_suite(suite)
    seeded = seeds is not None
    if only:
        names = {n for n, _ in runs}
        missing = [o for o in only if o not in names]
        if missing:
            raise ConfigError(f"--only names {missing} are not in the suite; valid: {', '.join(n for n, _ in runs)}")
        runs = [(n, c) for n, c in runs if n in only]
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg in runs:
        t0 = time.time()
        what = run_one(name, tracked_config(cfg, out, title), out / "runs" / name, log)
        row = collect_row(name, out / "runs" / name, cfg.seed if seeded else None)
        rows.append(row)
        log(
            f"[compare] {name}: {what} in {time.time() - t0:.0f}s; final acc {_fmt(row['final_accuracy'], 'final_accuracy')}, "
            f"uplink {_fmt(row['uplink_bpp'], 'uplink_bpp')} bpp, downlink {_fmt(row['downlink_bpp'], 'downlink_bpp')} bpp"
        )
    for p in write_outputs(out, title, rows):
        log(f"[compare] wrote {p}")
    return rows


def cmd_compare(args: argparse.Namespace) -> int:
    run_suite(args.suite, args.out, args.only)
    print((Path(args.out) / "comparison.md").read_text(), end="")
    return 0


def add_compare_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("compare", help="run a suite of methods on one setup; table and accuracy-vs-bpp plot")
    p.add_argument("--suite", required=True, help="suite TOML: [base] shared keys and [[runs]] (see configs/suites/default.toml)")
    p.add_argument("--out", required=True, help="output folder (runs/NAME per run, comparison.csv/.md/.png); rerun to resume")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this run of the suite (repeatable)")
    p.set_defaults(func=cmd_compare)

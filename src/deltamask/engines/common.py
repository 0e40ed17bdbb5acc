"""Round bookkeeping shared by the engines: client selection, evaluation, the metrics record,
and the files a finished run leaves behind. No engine-specific code here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import seeding
from ..client import evaluate
from ..config import Config
from ..experiment import Experiment
from ..methods import Reply
from ..metrics import read_jsonl, summarize, write_json
from ..server import ServerState


def select_clients(cfg: Config, round_: int, available: list[int] | None = None) -> list[int]:
    """K clients for this round, drawn from (seed, round) only: identical in every engine."""
    pool = list(range(cfg.num_clients)) if available is None else sorted(available)
    k = min(cfg.clients_per_round, len(pool))
    r = seeding.rng(cfg.seed, round_, -1, "select")
    return sorted(int(pool[i]) for i in r.choice(len(pool), size=k, replace=False))


def set_head(exp: Experiment, state: ServerState) -> None:
    with torch.no_grad():
        exp.net.head.weight.copy_(torch.from_numpy(state.head_weight))
        exp.net.head.bias.copy_(torch.from_numpy(state.head_bias))


def evaluate_global(exp: Experiment, state: ServerState, round_: int) -> dict[str, Any]:
    """Accuracy of the global model: deterministic mask [theta >= 0.5], and one sampled mask."""
    set_head(exp, state)
    exp.method.prepare_eval(state)
    mask = exp.method.eval_mask(state)
    acc, loss = evaluate(exp.net, exp.test_h, exp.test_y, mask)
    out: dict[str, Any] = {"accuracy": acc, "loss": loss}
    if exp.cfg.eval_sampled and exp.method.uses_masks():
        g = seeding.generator(exp.cfg.seed, round_, -1, "eval-sample")
        sampled = torch.rand(state.theta.shape, generator=g) < torch.from_numpy(state.theta)
        out["sampled_accuracy"], out["sampled_loss"] = evaluate(exp.net, exp.test_h, exp.test_y, sampled)
        out["mask_density"] = float((state.theta >= 0.5).mean())
    return out


def round_record(
    exp: Experiment,
    round_: int,
    selected: list[int],
    downlink_bits: dict[int, int],
    replies: list[Reply],
    failures: list[dict[str, Any]],
    info: dict[str, Any],
    evaluation: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    n = exp.net.num_masked
    n_all = exp.net.num_backbone_params
    up = sum(8 * len(r.payload) for r in replies)
    down = sum(downlink_bits.values())
    n_up = max(len(replies), 1)
    n_down = max(len(downlink_bits), 1)
    clients = info.get("clients", [])
    bound = [c["bound_bits"] for c in clients if "bound_bits" in c]
    rec: dict[str, Any] = {
        "round": round_,
        "phase": info.get("phase", "train"),
        "selected": selected,
        "num_replies": len(replies),
        "num_aggregated": info.get("num_good", len(replies)),
        "skipped_update": bool(info.get("skipped", False)),
        "failures": failures + info.get("dropped", []),
        "uplink_bits": up,
        "downlink_bits": down,
        "uplink_bpp": up / n_up / n,
        "downlink_bpp": down / n_down / n,
        "uplink_bpp_all": up / n_up / n_all,
        "downlink_bpp_all": down / n_down / n_all,
        "uplink_bound_bpp": (sum(bound) / len(bound) / n) if bound else None,
        "train_loss": float(np.mean([r.metrics.get("train_loss", np.nan) for r in replies])) if replies else None,
        "seconds": seconds,
    }
    if clients:
        rec["clients"] = clients
        fps = [c["false_positives"] for c in clients if "false_positives" in c]
        rec["false_positives"] = int(sum(fps)) if fps else 0
        bpk = [c["bits_per_key"] for c in clients if "bits_per_key" in c]
        if bpk:
            rec["bits_per_key"] = float(np.mean(bpk))
        keys = [r.metrics["num_keys"] for r in replies if "num_keys" in r.metrics]
        if keys:
            rec["mean_keys"] = float(np.mean(keys))
            rec["kappa"] = float(replies[0].metrics.get("kappa", np.nan))
    if evaluation:
        rec.update(evaluation)
    return rec


def finish_run(out: Path, exp: Experiment, state: ServerState, started: float) -> dict[str, Any]:
    """summary.json (from metrics.jsonl), plots, and the fine-tuned model artifact."""
    from ..artifact import save_artifact
    from ..report import plot_run

    records = read_jsonl(out / "metrics.jsonl")
    meta = exp.describe()
    meta.pop("masked_params", None)
    meta["config"] = exp.cfg.to_dict()
    summary = summarize(records, meta)
    summary["setup_seconds"] = exp.setup_seconds
    summary["elapsed_seconds"] = time.time() - started
    write_json(out / "summary.json", summary)
    plot_run(out)
    set_head(exp, state)
    save_artifact(out / "model.safetensors", exp, state)
    return summary


class Progress:
    """One status line per round on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool, total_rounds: int) -> None:
        self.enabled = enabled
        self.total = total_rounds
        self.tty = sys.stderr.isatty()
        self.round_times: list[float] = []

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[deltamask] {msg}", file=sys.stderr, flush=True)

    def clients(self, round_: int, done: int, total: int) -> None:
        if self.enabled and self.tty:
            print(f"\r[round {round_}/{self.total}] clients {done}/{total}   ", end="", file=sys.stderr, flush=True)

    def round_done(self, rec: dict[str, Any]) -> None:
        self.round_times.append(rec["seconds"])
        if not self.enabled:
            return
        left = self.total - rec["round"]
        eta = left * float(np.median(self.round_times[-5:]))
        acc = rec.get("accuracy")
        acc_s = f"acc {acc:.4f}" if acc is not None else "acc -"
        fails = f" | {len(rec['failures'])} failed" if rec["failures"] else ""
        line = (
            f"[round {rec['round']}/{self.total}] {rec['phase']:4s} | clients {rec['num_replies']}/{len(rec['selected'])} | "
            f"{acc_s} | up {rec['uplink_bpp']:.4f} bpp | down {rec['downlink_bpp']:.4f} bpp | "
            f"{rec['seconds']:.1f}s | ETA {int(eta // 60)}m{int(eta % 60):02d}s{fails}"
        )
        print(("\r" if self.tty else "") + line, file=sys.stderr, flush=True)


def write_config(out: Path, cfg: Config) -> None:
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")

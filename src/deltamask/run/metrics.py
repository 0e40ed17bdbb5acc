"""Byte accounting and the run's JSON outputs.

Every figure is derived from ``len(bytes)`` of real payloads. Per round (one JSON line):

``uplink_bits`` / ``downlink_bits``   summed over the round's clients (bits actually sent);
``uplink_bpp`` / ``downlink_bpp``     per client: bits / clients / N (N = masked scalars);
``uplink_bound_bpp``                  the information-theoretic bound of the uplink payloads
                                      (``log2 C(N,k)`` for index sets, the Bernoulli cross-entropy for
                                      masks), reported beside the actual size;
``uplink_bpp_all``                    per client, over all backbone parameters instead of N.

``summary.json`` is computed from ``metrics.jsonl`` (never from live objects), so a resumed run's
summary is the same as an uninterrupted one's, timings aside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from .files import append_line, write_atomic

TIMING_KEYS = ("seconds", "train_seconds", "eval_seconds", "wall_seconds", "elapsed_seconds")


def _clean(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and callable(o.item):
        return _clean(o.item())
    return o


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON line, appended and synced; a symlink at ``path`` is refused (never written through)."""
    append_line(path, json.dumps(_clean(record), sort_keys=True))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{p}: line {i} is not valid JSON (truncated write?)") from None
    return out


def truncate_metrics(path: str | Path, last_round: int) -> None:
    """Keep the lines of rounds <= last_round (used when resuming). An unreadable *last* line is the torn
    append of a round whose state was never saved (the state is written after its line), so it is dropped;
    an unreadable line before it is damage, and raises ``ValueError``."""
    p = Path(path)
    keep = []
    if p.is_file():
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):
                    break
                raise ValueError(f"{p}: line {i} is not valid JSON") from None
            if rec.get("round", 0) <= last_round:
                keep.append(rec)
    write_atomic(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def _mean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _mean_present(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return float(sum(vals) / len(vals)) if vals else None


def falling_streak(records: list[dict[str, Any]], min_rounds: int, min_drop: float) -> dict[str, Any] | None:
    """The fall the trajectory ends in, if it is one: the evaluated accuracy fell at each of the last
    ``min_rounds`` or more evaluations in a row, by ``min_drop`` or more in all. ``{"from_round",
    "to_round", "rounds", "from_accuracy", "to_accuracy", "fall"}``, else None (``min_rounds`` 0: off)."""
    if min_rounds <= 0:
        return None
    evals = [(r["round"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    k = 0  # consecutive decreases at the end
    while k + 1 < len(evals) and evals[-1 - k][1] < evals[-2 - k][1]:
        k += 1
    if k < min_rounds:
        return None
    (r0, a0), (r1, a1) = evals[-1 - k], evals[-1]
    if a0 - a1 < min_drop:
        return None
    return {"from_round": r0, "to_round": r1, "rounds": k, "from_accuracy": a0, "to_accuracy": a1, "fall": a0 - a1}


def downhill_report(records: list[dict[str, Any]], min_rounds: int, min_drop: float) -> dict[str, Any] | None:
    """What ``summary.json`` says of a run that walked downhill, or None: every falling streak of
    ``min_rounds``+ consecutive decreases by ``min_drop``+ in all (``falls``), and ``below_best`` when the
    final accuracy ends ``min_drop`` or more below the run's best (the best's round, the gap)."""
    if min_rounds <= 0:
        return None
    falls: list[dict[str, Any]] = []
    for i in range(len(records)):
        cur = falling_streak(records[: i + 1], min_rounds, min_drop)
        if cur is None:
            continue
        if falls and falls[-1]["from_round"] == cur["from_round"]:
            falls[-1] = cur  # the same streak, one round longer
        else:
            falls.append(cur)
    evals = [(r["round"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    out: dict[str, Any] = {}
    if falls:
        out["falls"] = falls
    if evals:
        best_round, best = max(evals, key=lambda e: (e[1], -e[0]))
        last_round, last = evals[-1]
        if best - last >= min_drop:
            out["below_best"] = {"best_round": best_round, "best_accuracy": best, "final_round": last_round,
                                 "final_accuracy": last, "gap": best - last}
    return out or None


def summarize(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """summary.json from the per-round records plus run metadata (method, model, N, config...)."""
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    up_bits = sum(r.get("uplink_bits", 0) for r in records)
    down_bits = sum(r.get("downlink_bits", 0) for r in records)
    mask_rounds = [r for r in records if r.get("phase") == "mask"]
    out = dict(meta)
    out.update(
        {
            "rounds_completed": len(records),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "final_sampled_accuracy": next((r.get("sampled_accuracy") for r in reversed(records) if r.get("sampled_accuracy") is not None), None),
            "mean_uplink_bpp": _mean(r.get("uplink_bpp") for r in records),
            "mean_downlink_bpp": _mean(r.get("downlink_bpp") for r in records),
            "mean_uplink_bpp_mask_rounds": _mean(r.get("uplink_bpp") for r in mask_rounds) if mask_rounds else None,
            "mean_uplink_bound_bpp": _mean(r.get("uplink_bound_bpp") for r in records if r.get("uplink_bound_bpp") is not None)
            if any(r.get("uplink_bound_bpp") is not None for r in records)
            else None,
            "mean_uplink_kl_floor_bpp": _mean_present(records, "uplink_kl_floor_bpp"),
            "mean_downlink_snapshot_bpp": _mean_present(records, "downlink_snapshot_bpp"),
            "mean_downlink_cond_entropy_bpp": _mean_present(records, "downlink_cond_entropy_bpp"),
            "total_uplink_bytes": up_bits // 8,
            "total_downlink_bytes": down_bits // 8,
            "total_false_positives": sum(r.get("false_positives", 0) or 0 for r in records),
            "wall_seconds": sum(r.get("seconds", 0.0) for r in records),
        }
    )
    return _clean(out)


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")

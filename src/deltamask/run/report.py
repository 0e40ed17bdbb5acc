"""Plots and tables, read from a run's JSON files (never from live objects)."""

from __future__ import annotations

from pathlib import Path

from .files import save_atomic
from .metrics import read_jsonl


def total_bpp(recs: list[dict]) -> list[tuple[int, float]]:
    """(round, uplink + downlink bpp per client) for every round that records both directions."""
    return [
        (r["round"], float(r["uplink_bpp"]) + float(r["downlink_bpp"]))
        for r in recs
        if r.get("uplink_bpp") is not None and r.get("downlink_bpp") is not None
    ]


def plot_run(out: str | Path) -> list[Path]:
    """accuracy.png (accuracy per round) and bpp.png (uplink, downlink and their sum, bpp per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out)
    recs = read_jsonl(d / "metrics.jsonl")
    rounds = [r["round"] for r in recs]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ev = [r for r in recs if r.get("accuracy") is not None]
    ax.plot([r["round"] for r in ev], [r["accuracy"] for r in ev], marker="o", ms=3, label="deterministic mask")
    sv = [r for r in recs if r.get("sampled_accuracy") is not None]
    if sv:
        ax.plot([r["round"] for r in sv], [r["sampled_accuracy"] for r in sv], ls="--", label="sampled mask")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("accuracy per round")
    fig.tight_layout()
    save_atomic(d / "accuracy.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append(d / "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(rounds, [r["uplink_bpp"] for r in recs], marker="o", ms=3, label="uplink (actual)")
    bound = [(r["round"], r["uplink_bound_bpp"]) for r in recs if r.get("uplink_bound_bpp")]
    if bound:
        ax.plot([b[0] for b in bound], [b[1] for b in bound], ls=":", label="uplink (entropy bound)")
    ax.plot(rounds, [r["downlink_bpp"] for r in recs], marker="s", ms=3, label="downlink (actual)")
    total = total_bpp(recs)
    ax.plot([t[0] for t in total], [t[1] for t in total], lw=2, color="black", alpha=0.7, label="total (up + down)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("round")
    ax.set_ylabel("bits per masked parameter, per client")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("communication per round")
    fig.tight_layout()
    save_atomic(d / "bpp.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append(d / "bpp.png")
    return written

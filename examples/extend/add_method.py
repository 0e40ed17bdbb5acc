"""Worked example (docs/architecture.md, "add a method"): an ablation of DeltaMask as a method of its own.

DeltaMask sends the top-kappa of a client's mask delta, ranked by how far each keep-probability moved. Does
the ranking matter, or would any kappa-fraction of the delta do? ``deltamask-random`` sends a uniformly
random ``ceil(kappa * |delta|)`` of it (drawn from the run's seed, so the run stays reproducible). Everything
else (the Beta posterior, the codecs, the downlink, the checks on every reply) is DeltaMask's, inherited: a
method overrides only what differs. ``register_method`` makes ``method="deltamask-random"`` a valid config value
in the process that imports this module (``build_config``, ``run_local``, or ``deltamask run --plugin
examples/extend/add_method.py --set method=deltamask-random``); the Flower apps know only the built-in methods.

    python examples/extend/add_method.py       # both methods side by side, 4 rounds each (~40 s on a CPU)
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from deltamask.fl import seeding
from deltamask.methods import register_method
from deltamask.methods.masks import DeltaMask


@register_method
class RandomDeltaMask(DeltaMask):
    name = "deltamask-random"
    description = "DeltaMask with a random kappa-fraction of the delta instead of the top-kappa (an ablation)"

    def encode_mask(self, m_k, theta_k, theta_g, ctx):  # type: ignore[no-untyped-def]
        delta = np.flatnonzero(m_k != (theta_g >= 0.5))  # the bits the client's sample changed
        kappa = self.kappa_of(ctx.round)  # DeltaMask's schedule
        keep = int(math.ceil(kappa * delta.size))
        rng = np.random.default_rng(seeding.derive_seed(ctx.seed, ctx.round, ctx.client_id, "random-delta"))
        kept = np.sort(rng.choice(delta, size=keep, replace=False)) if keep else delta[:0]
        seed = seeding.derive_seed(ctx.seed, ctx.round, ctx.client_id, "filter-seed")
        return self.index_codec.encode(kept, self.n, seed=seed), {"num_keys": float(kept.size),
                                                                  "delta_size": float(delta.size), "kappa": kappa}


def main(out_dir: str | None = None, **overrides: object) -> dict[str, dict]:
    from deltamask.config import build_config
    from deltamask.engines.local import run_local

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("deltamask", "deltamask-random"):
            cfg = build_config({"method": method, "dataset": "digits", "image_size": 32, "rounds": 4,
                                "head_warmup_rounds": 1, "num_clients": 4, "clients_per_round": 2, "train_samples": 400,
                                "test_samples": 200, "masked_blocks": 2, "progress": False, **overrides})
            out[method] = run_local(cfg, Path(out_dir or tmp) / method)
            print(f"{method:18s} final accuracy {out[method]['final_accuracy']:.3f}, "
                  f"uplink {out[method]['total_uplink_bytes']} bytes")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

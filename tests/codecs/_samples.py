"""Deterministic sample inputs shared by the codec tests and the golden-file generator."""

from __future__ import annotations

from typing import Any

import numpy as np

from deltamask.codecs import Codec, get_codec

GOLDEN_N = 1000


def golden_input(codec: Codec) -> dict[str, Any]:
    """Small deterministic encode arguments for ``codec`` (by kind)."""
    rng = np.random.default_rng(20240611)
    if codec.kind == "indices":
        return {"indices": np.sort(rng.choice(GOLDEN_N, 37, replace=False)), "n": GOLDEN_N, "seed": 5}
    if codec.kind == "mask":
        probs = rng.uniform(0.02, 0.98, GOLDEN_N).astype(np.float32)
        return {"mask": rng.random(GOLDEN_N) < probs, "probs": probs}
    if codec.kind == "array":
        if codec.name == "i64":  # a small integer header vector (baselines' downlink)
            return {"array": np.arange(-3, 5, dtype=np.int64)}
        if codec.lossy:  # gradient compressors take a flat update vector
            return {"array": rng.standard_normal(300).astype(np.float32)}
        return {"array": rng.standard_normal((3, 5)).astype(np.float32)}
    if codec.kind == "delta":  # theta's counts coded against an older version's counts
        old = rng.binomial(8, 0.4, GOLDEN_N)
        new = np.where(rng.random(GOLDEN_N) < 0.1, rng.binomial(6, 0.5, GOLDEN_N), np.minimum(old, 6))
        return {"mode": "cond", "n": GOLDEN_N, "base": bytes(range(16)), "target": bytes(range(16, 32)), "kind": "counts",
                "levels_t": new, "levels_v": old, "total_t": 6, "total_v": 8}
    counts = rng.binomial(8, 0.4, GOLDEN_N)
    from deltamask.codecs.dense import theta_from_counts

    return {"theta": theta_from_counts(counts, 8), "counts": counts, "total": 8}


def encode_sample(name: str) -> bytes:
    codec = get_codec(name)
    return codec.encode(**golden_input(codec))

"""Every random draw derives from (run seed, round, client, purpose): runs are reproducible, and a
resumed run draws exactly what an uninterrupted one would have."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

def derive_seed(seed: int, round_: int = 0, client: int = -1, purpose: str = "") -> int:
    """A 63-bit seed from the tuple; stable across platforms and Python versions."""
    h = hashlib.blake2b(f"{seed}|{round_}|{client}|{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(seed: int, round_: int = 0, client: int = -1, purpose: str = "", device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, round_, client, purpose))
    return g


def rng(seed: int, round_: int = 0, client: int = -1, purpose: str = "") -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, round_, client, purpose))

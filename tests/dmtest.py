"""Shared test helpers (importable from every test folder): a tiny, fast experiment config."""

from __future__ import annotations

import json
from pathlib import Path

from deltamask.config import Config, build_config

TINY = dict(
    model="timm:test_efficientnet",
    weights="random",
    dataset="digits",
    image_size=32,
    rounds=3,
    head_warmup_rounds=1,
    num_clients=3,
    clients_per_round=2,
    train_samples=240,
    test_samples=90,
    masked_blocks=2,
    batch_size=32,
    min_partition_size=10,
    head_epochs=2,
    progress=False,
)


def tiny_config(**overrides: object) -> Config:
    return build_config({**TINY, **overrides})


def model_is_finite(out: Path) -> bool:
    """Every float tensor of a run's ``model.safetensors`` is finite."""
    import numpy as np
    from safetensors.numpy import load_file

    arrays = load_file(str(out / "model.safetensors"))
    return all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib")


def assert_no_pickle(folder: Path) -> int:
    """Every file under ``folder``: no pickle suffix; a ``.safetensors`` file is exactly a safetensors file
    (8-byte length, JSON header, data covering the rest: its first byte is a length, so it may be 0x80);
    a ``.npy`` file loads with ``allow_pickle=False``; any other file does not open like a pickle (0x80 then
    protocol 2-5)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        assert p.suffix not in PICKLE_SUFFIXES, p
        if p.suffix == ".safetensors":
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + n])
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            assert 8 + n + max(ends, default=0) == len(data), f"{p} is not a plain safetensors file"
        elif p.suffix == ".npy":
            import numpy as np

            np.load(p, allow_pickle=False)
        else:
            assert not (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5), f"{p} starts like a pickle"
    return len(files)


class VirtualClock:
    """Stands in for the ``time`` module of the local engine (``monkeypatch.setattr(local, "time", clock)``):
    its ``monotonic()`` moves only when a test advances ``now``, so a scripted hang overruns the round
    timeout whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

"""Shared fixtures: a tiny, fast experiment (timm's test_efficientnet, random init, sklearn digits)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from deltamask.config import Config, build_config  # noqa: E402

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


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

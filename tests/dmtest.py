"""Shared test helpers (importable from every test folder): a tiny, fast experiment config."""

from __future__ import annotations

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

"""Flower's ``run_config`` -> the same :class:`deltamask.config.Config` as ``deltamask run``.

Every key of ``[tool.flwr.app.config]`` (and of ``flwr run --run-config``) is a deltamask config key
(kebab-case or snake_case), except the few Flower-only keys in :data:`FLOWER_KEYS`, which control the
engine and never change the computation. Unknown keys raise :class:`ConfigError` naming the key, exactly
as ``deltamask run --set`` does. Server and clients resolve the run's config the same way; the server
sends a hash of the config with every message and a client with a different config refuses to train.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from ...config import Config, ConfigError, build_config

#: Flower-only keys: (default, help). They steer the engine, not the experiment.
FLOWER_KEYS: dict[str, tuple[Any, str]] = {
    "out-dir": ("runs/flower", "where the ServerApp writes metrics.jsonl, summary.json, plots, model and state"),
    "round-timeout": (600.0, "seconds the server waits for a round's replies; a client not back by then is dropped"),
    "node-wait-timeout": (120.0, "seconds the server waits, before round 1, for num-clients SuperNodes to connect"),
}

#: keys that may differ between server and clients without changing the computation
HASH_EXCLUDED = ("progress", "device")


@dataclass(frozen=True)
class FlowerSettings:
    out_dir: str = FLOWER_KEYS["out-dir"][0]
    round_timeout: float = FLOWER_KEYS["round-timeout"][0]
    node_wait_timeout: float = FLOWER_KEYS["node-wait-timeout"][0]


def _flower_key(key: str) -> str | None:
    k = key.strip().replace("_", "-")
    return k if k in FLOWER_KEYS else None


def resolve(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> tuple[Config, FlowerSettings]:
    """``defaults`` (e.g. a test's overrides) updated with ``run_config``, split into the experiment's
    Config and the engine's settings."""
    merged: dict[str, Any] = {**(defaults or {}), **dict(run_config)}
    cfg_items: dict[str, Any] = {}
    fl: dict[str, Any] = {}
    for key, value in merged.items():
        fk = _flower_key(key)
        if fk is None:
            cfg_items[key] = value
            continue
        default = FLOWER_KEYS[fk][0]
        try:
            fl[fk.replace("-", "_")] = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"run_config key {key!r} expects {type(default).__name__}, got {value!r}") from None
    settings = FlowerSettings(**fl)
    if settings.round_timeout <= 0 or settings.node_wait_timeout < 0:
        raise ConfigError("run_config keys 'round-timeout' must be > 0 and 'node-wait-timeout' >= 0")
    return build_config(cfg_items, from_strings=True), settings


def config_hash(cfg: Config) -> str:
    """A short fingerprint of everything that changes the computation."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def app_config_table(cfg: Config | None = None, settings: FlowerSettings | None = None) -> dict[str, Any]:
    """Every key the app accepts, kebab-case, with its value: the ``[tool.flwr.app.config]`` table."""
    cfg = cfg or Config()
    settings = settings or FlowerSettings()
    out = {k.replace("_", "-"): v for k, v in cfg.to_dict().items()}
    out.update({k: getattr(settings, k.replace("-", "_")) for k in FLOWER_KEYS})
    return out

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
from pathlib import Path
from typing import Any, Mapping

from ...config import ENGINE_KEYS, HASH_EXCLUDED, Config, ConfigError, EngineSettings, build_config, split_engine_keys

#: Flower-only keys: (default, help). They steer the engine, not the experiment.
FLOWER_KEYS: dict[str, tuple[Any, str]] = ENGINE_KEYS

#: the engine's settings (``EngineSettings``: one place for the keys, their defaults and help)
FlowerSettings = EngineSettings
__all__ = ["FLOWER_KEYS", "HASH_EXCLUDED", "FlowerSettings", "app_config_table", "config_hash", "out_dir_of", "resolve"]


def resolve(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> tuple[Config, FlowerSettings]:
    """``defaults`` (e.g. a test's overrides) updated with ``run_config``, split into the experiment's
    Config and the engine's settings. An unknown key raises :class:`ConfigError` naming it."""
    merged: dict[str, Any] = {**(defaults or {}), **dict(run_config)}
    cfg_items, fl = split_engine_keys(merged)
    settings = FlowerSettings(**fl)
    if settings.round_timeout <= 0 or settings.node_wait_timeout < 0:
        raise ConfigError("run_config keys 'round-timeout' must be > 0 and 'node-wait-timeout' >= 0")
    return build_config(cfg_items, from_strings=True), settings


def out_dir_of(settings: FlowerSettings, run_id: int | None) -> Path:
    """Where the ServerApp writes: ``out-dir`` if given (it must be absolute: a relative path would
    land wherever the SuperLink happened to start), else ``~/deltamask-runs/flower-RUN_ID``."""
    if not settings.out_dir:
        return Path.home() / "deltamask-runs" / f"flower-{run_id if run_id is not None else 'run'}"
    p = Path(settings.out_dir).expanduser()
    if not p.is_absolute():
        raise ConfigError(
            f"run_config key 'out-dir' = {settings.out_dir!r} is relative, so it would land wherever the SuperLink "
            f"was started; give an absolute path, e.g. out-dir=\"{Path.cwd() / settings.out_dir}\""
        )
    return p


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

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
import os
from pathlib import Path
from typing import Any, Mapping

from ...config import ENGINE_KEYS, HASH_EXCLUDED, Config, ConfigError, EngineSettings, build_config, split_engine_keys

#: Flower-only keys: (default, help). They steer the engine, not the experiment.
FLOWER_KEYS: dict[str, tuple[Any, str]] = ENGINE_KEYS

#: the engine's settings (``EngineSettings``: one place for the keys, their defaults and help)
FlowerSettings = EngineSettings
__all__ = ["FLOWER_KEYS", "HASH_EXCLUDED", "FlowerSettings", "app_config_table", "config_hash", "out_dir_of", "out_root", "resolve"]


def resolve(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> tuple[Config, FlowerSettings]:
    """``defaults`` (e.g. a test's overrides) updated with ``run_config``, split into the experiment's
    Config and the engine's settings. An unknown key raises :class:`ConfigError` naming it."""
    merged: dict[str, Any] = {**(defaults or {}), **dict(run_config)}
    cfg_items, fl = split_engine_keys(merged)
    settings = FlowerSettings(**fl)
    if settings.round_timeout <= 0 or settings.node_wait_timeout < 0:
        raise ConfigError("run_config keys 'round-timeout' must be > 0 and 'node-wait-timeout' >= 0")
    return build_config(cfg_items, from_strings=True), settings


#: the environment variable (on the SuperLink's machine) naming the folder every Flower run writes below
OUT_ROOT_ENV = "DELTAMASK_OUT_ROOT"


def out_root() -> Path:
    """The server-side output root: ``$DELTAMASK_OUT_ROOT`` (absolute), else ``~/deltamask-runs``."""
    root = Path(os.environ.get(OUT_ROOT_ENV) or Path.home() / "deltamask-runs").expanduser()
    if not root.is_absolute():
        raise ConfigError(f"{OUT_ROOT_ENV}={str(root)!r} is relative (it would depend on where the ServerApp starts); "
                          "set it to an absolute folder on the SuperLink's machine")
    return root


def check_below_root(key: str, path: str | Path, root: str | Path) -> Path:
    """``path`` (absolute, symlinks and ``..`` resolved) must lie in ``root``; else :class:`ConfigError`."""
    p = Path(path).expanduser()
    real, real_base = Path(os.path.realpath(p)), Path(os.path.realpath(root))
    if real != real_base and real_base not in real.parents:
        raise ConfigError(
            f"run_config key {key!r} = {str(p)!r} (resolved: {real}) is outside the server's output root {real_base}: a Flower "
            f"run config may only write below it; choose a folder under it, or start the SuperLink with {OUT_ROOT_ENV} set to a "
            "folder that holds this one"
        )
    return p


def out_dir_of(settings: FlowerSettings, run_id: int | None, root: str | Path | None = None) -> Path:
    """Where the ServerApp writes: ``out-dir`` if given (it must be absolute: a relative path would
    land wherever the SuperLink happened to start), else ``ROOT/flower-RUN_ID``.

    A run config is another party's input (anyone who can reach the Control API can submit one), so the
    folder must lie below the server-side output root ``root`` (default :func:`out_root`), after every
    symlink and ``..`` is resolved: a run config cannot make the ServerApp write, or ``overwrite`` delete,
    anywhere else."""
    base = Path(root) if root is not None else out_root()
    if not settings.out_dir:
        p = base / f"flower-{run_id if run_id is not None else 'run'}"
    else:
        p = Path(settings.out_dir).expanduser()
        if not p.is_absolute():
            raise ConfigError(
                f"run_config key 'out-dir' = {settings.out_dir!r} is relative, so it would land wherever the SuperLink "
                f"was started; give an absolute path below the output root {base}, e.g. out-dir=\"{base / settings.out_dir}\""
            )
    return check_below_root("out-dir", p, base)


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

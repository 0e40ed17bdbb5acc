"""Federated methods, found by name (``--set method=NAME``); unknown names list the valid ones."""

from __future__ import annotations

from ..config import Config, ConfigError, register_method_name
from ..model.masking import MaskedNetwork
from .base import Aggregation, ClientContext, ClientData, ClientFailure, Failure, Method, Reply
from .baselines import BASELINES
from .masks import DeltaMask, FedPM, LinearProbe

METHODS: dict[str, type[Method]] = {m.name: m for m in (DeltaMask, FedPM, LinearProbe, *BASELINES)}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator for methods defined elsewhere (baselines, plug-ins)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    register_method_name(cls.name)
    return cls


def create_method(cfg: Config, net: MaskedNetwork) -> Method:
    cls = METHODS.get(cfg.method)
    if cls is None:
        raise ConfigError(f"config key 'method': unknown method {cfg.method!r}; valid: {', '.join(sorted(METHODS))}")
    return cls(cfg, net)


__all__ = ["METHODS", "Aggregation", "ClientContext", "ClientData", "ClientFailure", "Failure", "Method", "Reply", "create_method", "register_method"]

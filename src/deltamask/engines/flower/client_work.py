"""The client's computation on a SuperNode: this partition's experiment (kept in memory, else read
from the node's disk cache, else built) and one ``method.client_update``. Runs in the ClientApp process
(simulation) or in the node's long-lived worker (deployment); the ClientApp around it only moves bytes.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ...config import Config
from ...run.experiment import Experiment, build_experiment
from ...methods import ClientContext, ClientData, ClientFailure
from .node_cache import client_experiment_cached, default_cache_dir
from .records import payload_stype
from .settings import config_hash

#: experiments kept per process (a simulation worker serves many partitions)
CACHE_SIZE = int(os.environ.get("DELTAMASK_FLOWER_CACHE", "8"))
_CACHE: OrderedDict[tuple[str, int], tuple[Experiment, ClientData]] = OrderedDict()


@dataclass
class TrainResult:
    payload: bytes
    stype: str
    num_samples: int
    metrics: dict[str, float]
    state: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def node_cache_dir(node_config: Mapping[str, Any]) -> Path | None:
    """The node's disk cache: ``node_config["cache-dir"]`` (``none`` turns it off), else
    ``$DELTAMASK_NODE_CACHE``, else ``~/.cache/deltamask/node``."""
    spec = str(node_config.get("cache-dir", "")).strip()
    if spec.lower() == "none":
        return None
    return Path(spec).expanduser() if spec else default_cache_dir()


def client_experiment(cfg: Config, pid: int, cache_dir: Path | None = None) -> tuple[Experiment, ClientData]:
    """This partition's experiment and data: from this process's memory (a simulation worker or a node
    worker serves many rounds), else from the node's disk cache, else built (the test set is never
    prepared on a client)."""
    key = (config_hash(cfg) + cfg.device, pid)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    if cache_dir is not None:
        exp, data, _ = client_experiment_cached(cfg, pid, cache_dir)
        entry = (exp, data)
    else:
        exp = build_experiment(cfg, clients=[pid], test=False)
        entry = (exp, exp.client_data(pid))
    _CACHE[key] = entry
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


def client_train(cfg: Config, pid: int, node_config: Mapping[str, Any], downlink: bytes, round_: int, state: dict[str, Any]) -> TrainResult:
    """One client update of partition ``pid``: the reply payload, its record stype, and the client's
    new cache (``state`` is the cache it held)."""
    t0 = time.time()
    exp, data = client_experiment(cfg, pid, node_cache_dir(node_config))
    if data.num_samples == 0:
        raise ClientFailure("client has no training data")
    ctx = ClientContext(round_, pid, cfg.seed, state)
    reply = exp.method.client_update(downlink, data, ctx)
    return TrainResult(
        payload=reply.payload,
        stype=payload_stype(reply.payload),
        num_samples=int(reply.num_samples),
        metrics={k: float(v) for k, v in reply.metrics.items()},
        state=ctx.state,
        seconds=time.time() - t0,
    )

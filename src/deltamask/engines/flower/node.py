"""What a SuperNode is, read from its ``node_config``: which client it serves, its device, its caches,
whether it computes in a long-lived worker, and the test fault it is scripted to commit. Light imports
only (config, no torch): the deployment ClientApp process loads this on every message.

``node_config`` keys (``flower-supernode --node-config "k=v k=v"``):

* ``partition-id``, ``num-partitions`` (required): the deltamask client id this node serves and the run's
  ``num-clients``;
* ``device``: the node's own torch device (does not change the result);
* ``cache-dir``: the node's disk cache of its partition (``none``: off; default
  ``$DELTAMASK_NODE_CACHE`` or ``~/.cache/deltamask/node``);
* ``worker``: ``auto`` (default), ``on`` or ``off``. With ``on`` the node computes in a long-lived
  worker process (:mod:`deltamask.engines.flower.worker`) that keeps torch, the model and the partition in
  memory between rounds; with ``off`` each ClientApp process computes itself. ``auto`` means ``on`` in a
  deployment's ``flwr-clientapp`` process (Flower 1.42 starts one per message) and ``off`` elsewhere
  (simulation workers already live across rounds);
* ``test-fault`` = ``KIND@ROUND`` (tests only; see :class:`ScriptedFault`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...config import Config, ConfigError
from .settings import resolve

#: test hook: fault(round, client_id) may raise, sleep, exit, or return "malformed" to corrupt the reply
FaultHook = Callable[[int, int], "str | None"]


class NodeRefusal(RuntimeError):
    """This node cannot serve the run as configured; the message says how to start it instead."""


def node_config_of(run_config: Mapping[str, Any], node_config: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> Config:
    cfg, _ = resolve(run_config, defaults)
    if "device" in node_config:  # a node may pick its own device (does not change the result)
        cfg = cfg.replace(device=str(node_config["device"]))
    return cfg


#: every node_config key deltamask reads (Flower's simulation sets partition-id and num-partitions itself)
NODE_KEYS = ("partition-id", "num-partitions", "device", "cache-dir", "worker", "test-fault")


def node_partition(node_config: Mapping[str, Any], cfg: Config) -> int:
    """This node's client id, checked against the run's config. A key deltamask does not know (a typo
    such as ``workers``) is refused rather than ignored."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise NodeRefusal(
            f"unknown node_config key(s) {', '.join(unknown)}; deltamask reads {', '.join(NODE_KEYS)} "
            "(restart this SuperNode with a corrected --node-config)"
        )
    if "partition-id" not in node_config:
        raise NodeRefusal("node_config has no 'partition-id'; start the SuperNode with --node-config \"partition-id=I num-partitions=N\"")
    pid = int(node_config["partition-id"])
    nparts = int(node_config.get("num-partitions", cfg.num_clients))
    if nparts != cfg.num_clients:
        raise NodeRefusal(
            f"node_config num-partitions={nparts} but the run has num-clients={cfg.num_clients}: start this SuperNode with "
            f"--node-config \"partition-id={pid} num-partitions={cfg.num_clients}\" (or run with num-clients={nparts})"
        )
    if not 0 <= pid < cfg.num_clients:
        raise NodeRefusal(f"node_config partition-id={pid} is outside 0..{cfg.num_clients - 1}: give each SuperNode its own id in that range")
    return pid


def in_clientapp_process() -> bool:
    """True in the ``flwr-clientapp`` process a deployment's SuperNode starts for each message."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "flwr-clientapp"


def uses_worker(node_config: Mapping[str, Any]) -> bool:
    spec = str(node_config.get("worker", "auto")).strip().lower()
    if spec in ("on", "true", "1", "yes"):
        return True
    if spec in ("off", "false", "0", "no"):
        return False
    if spec == "auto":
        return in_clientapp_process()
    raise ConfigError(f"node_config worker={spec!r}: use auto, on or off")


@dataclass(frozen=True)
class ScriptedFault:
    """Test hook: misbehave as scripted. ``script`` holds ``(round, client, kind)`` with kind ``raise``
    (the update raises), ``malformed`` (the reply payload is garbage), ``forged-samples`` /
    ``forged-metrics`` (the reply claims 10^9 samples / NaN metrics), ``hang:SECONDS`` (sleep, to
    overrun the round timeout), ``exit`` (the ClientApp process dies), or a payload fault of
    :func:`deltamask.testing.faults.forge` (the reply is computed, then forged). Picklable, so it reaches
    simulation workers. It runs in the ClientApp process, before any work is handed to a node worker."""

    script: tuple[tuple[int, int, str], ...]

    def __call__(self, round_: int, cid: int) -> str | None:
        for r, c, kind in self.script:
            if (r, c) != (round_, cid):
                continue
            if kind == "raise":
                raise RuntimeError(f"scripted fault: client {cid} raises in round {round_}")
            if kind.startswith("hang"):
                time.sleep(float(kind.partition(":")[2] or 3600))
                return None
            if kind == "exit":
                os._exit(17)
            return kind
        return None


def node_fault(node_config: Mapping[str, Any], pid: int) -> ScriptedFault | None:
    """``node_config["test-fault"] = "KIND@ROUND[,KIND@ROUND...]"``: this node misbehaves in those rounds
    (tests only). KIND: ``raise``, ``hang:SECONDS``, ``exit``, ``malformed``, or a payload fault of
    :data:`deltamask.testing.faults.PAYLOAD_FAULTS` (``truncated``, ``oversized``, ``wrong-codec``, ``wrong-n``,
    ``n32``), applied to the real reply."""
    spec = node_config.get("test-fault")
    if not spec:
        return None
    script = []
    for item in str(spec).split(","):
        kind, _, rnd = item.strip().rpartition("@")
        script.append((int(rnd), pid, kind))
    return ScriptedFault(tuple(script))

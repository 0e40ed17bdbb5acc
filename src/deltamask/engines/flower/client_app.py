"""The deltamask ClientApp: unpack the downlink bytes, run the core client update, pack the reply.

A SuperNode serves one client: ``node_config["partition-id"]`` is the deltamask client id and
``node_config["num-partitions"]`` must equal the run's ``num-clients`` (the data split is computed from
the config, identically on every node). The node prepares its own partition only, never the test set,
and keeps it between rounds: in memory where the process lives on (simulation), and in a per-node disk
cache (:mod:`deltamask.node_cache`, keyed by a hash of everything that determines it, verified on
load, rebuilt when it does not match) for deployments, where every message starts a fresh process.
``node_config["cache-dir"]`` picks the folder (``none``: off).

Messages:

* ``query``: the server asks who this node is; reply: partition id, number of partitions, config hash.
* ``train``: payload = ``method.downlink`` bytes; reply payload = ``Reply.payload`` bytes, plus the sample
  count and the client's metrics (a MetricRecord). A client that fails replies with its reason (and
  forgets its cache, so the server resends everything next time, as in the local engine).

The client's cache (last theta / head received) lives in Flower's per-node ``context.state``.

Testing hook: ``node_config["test-fault"] = "KIND@ROUND"`` (KIND: ``raise``, ``malformed``,
``hang:SECONDS``, ``exit``; see :class:`ScriptedFault`) makes this node misbehave in that round. It exists
for the fault tests; leave it unset.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ...config import Config, ConfigError
from ...experiment import Experiment, build_experiment
from ...methods import ClientContext, ClientData, ClientFailure
from ...node_cache import client_experiment_cached, default_cache_dir
from .records import (
    META_KEY,
    clear_client_state,
    load_client_state,
    pack_payload,
    save_client_state,
    unpack_meta,
    unpack_payload,
)
from .settings import config_hash, resolve

log = logging.getLogger("deltamask")

METRICS_KEY = "deltamask.metrics"
#: experiments kept per process (a simulation worker serves many partitions)
CACHE_SIZE = int(os.environ.get("DELTAMASK_FLOWER_CACHE", "8"))
_CACHE: OrderedDict[tuple[str, int], tuple[Experiment, ClientData]] = OrderedDict()

#: test hook: fault(round, client_id) may raise, sleep, or return "malformed" to corrupt the reply
FaultHook = Callable[[int, int], "str | None"]


def node_partition(context: Context, cfg: Config) -> int:
    """This node's client id, checked against the run's config."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ClientFailure("node_config has no 'partition-id'; start the SuperNode with --node-config \"partition-id=I num-partitions=N\"")
    pid = int(nc["partition-id"])
    nparts = int(nc.get("num-partitions", cfg.num_clients))
    if nparts != cfg.num_clients:
        raise ClientFailure(
            f"node_config num-partitions={nparts} but the run has num-clients={cfg.num_clients}: start this SuperNode with "
            f"--node-config \"partition-id={pid} num-partitions={cfg.num_clients}\" (or run with num-clients={nparts})"
        )
    if not 0 <= pid < cfg.num_clients:
        raise ClientFailure(f"node_config partition-id={pid} is outside 0..{cfg.num_clients - 1}: give each SuperNode its own id in that range")
    return pid


def node_config_of(context: Context, defaults: dict[str, Any] | None) -> Config:
    cfg, _ = resolve(context.run_config, defaults)
    if "device" in context.node_config:  # a node may pick its own device (does not change the result)
        cfg = cfg.replace(device=str(context.node_config["device"]))
    return cfg


def node_cache_dir(context: Context) -> Path | None:
    """The node's disk cache: ``node_config["cache-dir"]`` (``none`` turns it off), else
    ``$DELTAMASK_NODE_CACHE``, else ``~/.cache/deltamask/node``."""
    spec = str(context.node_config.get("cache-dir", "")).strip()
    if spec.lower() == "none":
        return None
    return Path(spec).expanduser() if spec else default_cache_dir()


def client_experiment(cfg: Config, pid: int, cache_dir: Path | None = None) -> tuple[Experiment, ClientData]:
    """This partition's experiment and data: from this process's memory (a simulation worker serves
    many rounds), else from the node's disk cache (a deployment starts a process per message), else
    built (the test set is never prepared on a client)."""
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


@dataclass(frozen=True)
class ScriptedFault:
    """Test hook: misbehave as scripted. ``script`` holds ``(round, client, kind)`` with kind ``raise``
    (the update raises), ``malformed`` (the reply payload is garbage), ``hang:SECONDS`` (sleep, to
    overrun the round timeout) or ``exit`` (the client process dies). Picklable, so it reaches
    simulation workers."""

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


def _node_fault(context: Context, pid: int) -> ScriptedFault | None:
    """``node_config["test-fault"] = "KIND@ROUND"``: this node misbehaves in that round (tests only)."""
    spec = context.node_config.get("test-fault")
    if not spec:
        return None
    kind, _, rnd = str(spec).rpartition("@")
    return ScriptedFault(((int(rnd), pid, kind),))


def make_client_app(defaults: dict[str, Any] | None = None, fault: FaultHook | None = None) -> ClientApp:
    """A ClientApp. ``defaults`` are config keys under the run's ``run_config`` (used where Flower
    passes none, e.g. ``run_simulation``); ``fault`` is a test hook."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = node_config_of(context, defaults)
        pid = node_partition(context, cfg)
        meta = {"partition-id": pid, "num-partitions": cfg.num_clients, "config-hash": config_hash(cfg)}
        return Message(RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.time()
        cfg = node_config_of(context, defaults)
        pid = node_partition(context, cfg)
        meta = unpack_meta(msg.content)
        rnd = int(meta["round"])
        try:
            if meta.get("config-hash") != config_hash(cfg):
                raise ConfigError(f"server config hash {meta.get('config-hash')} != this node's {config_hash(cfg)}: run configs differ")
            if int(meta.get("client-id", -1)) != pid:
                raise ClientFailure(f"message for client {meta.get('client-id')} reached partition {pid}")
            hook = fault or _node_fault(context, pid)
            action = hook(rnd, pid) if hook is not None else None
            exp, data = client_experiment(cfg, pid, node_cache_dir(context))
            if data.num_samples == 0:
                raise ClientFailure("client has no training data")
            cache = load_client_state(context.state)
            ctx = ClientContext(rnd, pid, cfg.seed, cache)
            reply = exp.method.client_update(unpack_payload(msg.content), data, ctx)
        except Exception as e:  # noqa: BLE001 - reported to the server, which drops this client
            reason = f"{type(e).__name__}: {e}"
            log.warning("round %d: client %d failed: %s", rnd, pid, reason)
            log.debug("%s", traceback.format_exc())
            clear_client_state(context.state)
            content = RecordDict({META_KEY: ConfigRecord({"round": rnd, "client-id": pid, "error": reason})})
            return Message(content, reply_to=msg)
        save_client_state(context.state, ctx.state)
        payload = reply.payload
        if action == "malformed":
            payload = b"DMSK" + bytes(range(256)) * 3
        content = pack_payload(
            payload,
            {"round": rnd, "client-id": pid, "num-samples": int(reply.num_samples), "client-seconds": time.time() - t0},
        )
        content[METRICS_KEY] = MetricRecord({k: float(v) for k, v in reply.metrics.items()})
        return Message(content, reply_to=msg)

    return app


#: the app ``flwr run`` loads (``clientapp = "deltamask.engines.flower.client_app:app"``)
app = make_client_app()

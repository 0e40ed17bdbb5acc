"""The deltamask ClientApp: unpack the downlink bytes, have the client update computed, pack the reply.

A SuperNode serves one client: ``node_config["partition-id"]`` is the deltamask client id and
``node_config["num-partitions"]`` must equal the run's ``num-clients`` (the data split is computed from
the config, identically on every node). Node settings are listed in :mod:`deltamask.engines.flower.node`.

Where the update is computed (:mod:`~deltamask.engines.flower.client_work`):

* in a deployment, in the SuperNode's long-lived node worker (:mod:`~deltamask.engines.flower.worker`):
  Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so this module imports no
  torch and only forwards bytes; the worker keeps torch, the model and the partition in memory;
* in a simulation (and with ``node_config worker=off``), in this process, which keeps the experiment in
  memory (simulation workers live across rounds) and in the node's disk cache.

Messages:

* ``query``: the server asks who this node is; reply: partition id, number of partitions, config hash.
* ``train``: payload = ``method.downlink`` bytes; reply payload = ``Reply.payload`` bytes, plus the sample
  count and the client's metrics (a MetricRecord). A client that fails replies with its reason (and
  forgets its cache, so the server resends everything next time, as in the local engine).

The client's cache (last theta / head received) lives in Flower's per-node ``context.state``.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ...config import ConfigError
from ...errors import failure_kind
from .node import FaultHook, ScriptedFault, node_config_of, node_fault, node_partition, uses_worker
from .records import (
    META_KEY,
    clear_client_state,
    load_client_state,
    pack_payload,
    save_client_state,
    split_state,
    unpack_meta,
    unpack_payload,
)
from .settings import config_hash
from .wire import pack_arrays, unpack_arrays

log = logging.getLogger("deltamask")

METRICS_KEY = "deltamask.metrics"
__all__ = ["METRICS_KEY", "ScriptedFault", "app", "make_client_app"]


def _train_in_worker(context: Context, defaults: dict[str, Any] | None, meta_round: int, downlink: bytes, state: dict[str, Any]):  # noqa: ANN202
    """The update computed by the node worker: (payload, stype, num_samples, metrics, new state)."""
    from .worker import WorkerClient, WorkerError

    arrays, scalars = split_state(state)
    spec, blobs = pack_arrays(arrays, "state/")
    blobs["payload"] = downlink
    header = {
        "op": "train", "round": meta_round, "run_config": dict(context.run_config), "node_config": dict(context.node_config),
        "defaults": defaults, "state_arrays": spec, "state_scalars": scalars,
    }
    reply, out = WorkerClient().call(header, blobs)
    if not reply.get("ok"):
        raise WorkerError(str(reply.get("error")), str(reply.get("kind", "error")))
    new_state = dict(reply["state_scalars"])
    new_state.update(unpack_arrays(reply["state_arrays"], out, "state/"))
    return out["payload"], reply["stype"], int(reply["num_samples"]), dict(reply["metrics"]), new_state


def _train_here(context: Context, cfg, pid: int, meta_round: int, downlink: bytes, state: dict[str, Any]):  # noqa: ANN001, ANN202
    from .client_work import client_train

    res = client_train(cfg, pid, context.node_config, downlink, meta_round, state)
    return res.payload, res.stype, res.num_samples, res.metrics, res.state


def make_client_app(defaults: dict[str, Any] | None = None, fault: FaultHook | None = None) -> ClientApp:
    """A ClientApp. ``defaults`` are config keys under the run's ``run_config`` (used where Flower
    passes none, e.g. ``run_simulation``); ``fault`` is a test hook."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = node_config_of(context.run_config, context.node_config, defaults)
        pid = node_partition(context.node_config, cfg)
        meta = {"partition-id": pid, "num-partitions": cfg.num_clients, "config-hash": config_hash(cfg)}
        return Message(RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.time()
        cfg = node_config_of(context.run_config, context.node_config, defaults)
        pid = node_partition(context.node_config, cfg)
        meta = unpack_meta(msg.content)
        rnd = int(meta["round"])
        try:
            if meta.get("config-hash") != config_hash(cfg):
                raise ConfigError(f"server config hash {meta.get('config-hash')} != this node's {config_hash(cfg)}: run configs differ")
            if int(meta.get("client-id", -1)) != pid:
                raise RuntimeError(f"message for client {meta.get('client-id')} reached partition {pid}")
            hook = fault or node_fault(context.node_config, pid)
            action = hook(rnd, pid) if hook is not None else None
            downlink, state = unpack_payload(msg.content), load_client_state(context.state)
            if uses_worker(context.node_config):
                payload, stype, n, metrics, new_state = _train_in_worker(context, defaults, rnd, downlink, state)
            else:
                payload, stype, n, metrics, new_state = _train_here(context, cfg, pid, rnd, downlink, state)
        except Exception as e:  # noqa: BLE001 - reported to the server, which drops this client
            reason = f"{type(e).__name__}: {e}"
            kind = failure_kind(e)  # a WorkerError carries the kind the worker's update failed with
            log.warning("round %d: client %d failed: %s", rnd, pid, reason)
            log.debug("%s", traceback.format_exc())
            clear_client_state(context.state)
            content = RecordDict({META_KEY: ConfigRecord({"round": rnd, "client-id": pid, "error": reason, "error-kind": kind})})
            return Message(content, reply_to=msg)
        save_client_state(context.state, new_state)
        if action == "malformed":
            payload, stype = b"DMSK" + bytes(range(256)) * 3, None
        elif action == "forged-samples":  # a hostile node's envelope (tests only): the server's count must win
            n = 10**9
        elif action == "forged-metrics":
            metrics = {**metrics, "num_keys": float("nan"), "train_loss": float("inf")}
        elif action:  # a scripted payload fault (tests only): the real reply, forged
            from ...testing.faults import forge

            payload, stype = forge(action, payload), None
        content = pack_payload(
            payload, {"round": rnd, "client-id": pid, "num-samples": n, "client-seconds": time.time() - t0}, stype=stype,
        )
        content[METRICS_KEY] = MetricRecord({k: float(v) for k, v in metrics.items()})
        return Message(content, reply_to=msg)

    return app


#: the app ``flwr run`` loads (``clientapp = "deltamask.engines.flower.client_app:app"``)
app = make_client_app()

"""The deltamask Strategy: packs, sends, collects and unpacks. The round logic is the core's.

Per round, exactly as :func:`deltamask.engines.local.run_local`: select K clients from (seed, round)
among the partitions whose SuperNodes are connected (all of them: the same clients as the local
engine), ``method.downlink`` -> bytes -> a ``train`` message per client; replies -> ``Reply`` objects in
client order -> ``method.aggregate``; evaluate with the core's ``evaluate_global``; one line in
``metrics.jsonl``; the server state saved. Bits are counted from the codec bytes as in the local engine;
``flower_*`` fields add what Flower counts (``count_bytes()`` of the records, and the serialized size of
the messages).

A client whose reply is an error, is missing when ``round-timeout`` expires, or cannot be unpacked is
dropped from the round with its reason (logged and in the record's ``failures``); the core drops
payloads it cannot decode and skips the update when fewer than ``min_replies`` are good.

Which SuperNode serves which client id is asked with a ``query`` message (``partition-id`` from the
node's ``node_config``) whenever a node id is new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ...experiment import Experiment
from ...methods import Reply
from ...metrics import append_jsonl
from ...server import ServerState
from ...state import save_state
from ..common import Progress, evaluate_global, round_record, select_clients
from .client_app import METRICS_KEY
from .records import META_KEY, RecordError, pack_payload, record_bytes, unpack_meta, unpack_payload, wire_bytes
from .settings import FlowerSettings, config_hash

log = logging.getLogger("deltamask")


def _last_line(text: str | None) -> str:
    """The last line of a traceback-like reason (the exception itself)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no reason given)"


class DeltaMaskStrategy(Strategy):
    """Drives deltamask's core ``Method`` over a Flower ``Grid``."""

    def __init__(self, exp: Experiment, out: Path, settings: FlowerSettings, progress: Progress | None = None) -> None:
        self.exp = exp
        self.cfg = exp.cfg
        self.method = exp.method
        self.out = Path(out)
        self.settings = settings
        self.progress = progress or Progress(False, self.cfg.rounds)
        self.hash = config_hash(self.cfg)
        self.state: ServerState = self.method.init_state()
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.refused: set[int] = set()  # node ids that answered the query with an error
        self._round: dict[str, Any] = {}

    # --- nodes -------------------------------------------------------------------------------------
    def discover(self, grid: Grid, wait: float = 0.0) -> list[int]:
        """Ask new nodes which partition they serve; wait up to ``wait`` s for all ``num_clients``."""
        deadline = time.time() + wait
        while True:
            live = set(int(n) for n in grid.get_node_ids())
            for nid in [n for n in self.client_of if n not in live]:  # gone: forget the mapping
                cid = self.client_of.pop(nid)
                if self.node_of.get(cid) == nid:
                    del self.node_of[cid]
            new = sorted(live - set(self.client_of) - self.refused)
            if new:
                msgs = [Message(RecordDict({META_KEY: ConfigRecord({"config-hash": self.hash})}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
                for reply in grid.send_and_receive(msgs, timeout=max(10.0, min(self.settings.round_timeout, 60.0))):
                    nid = int(reply.metadata.src_node_id)
                    if reply.has_error():
                        log.warning("node %d refused to join: %s", nid, reply.error.reason)
                        self.refused.add(nid)
                        continue
                    try:
                        meta = unpack_meta(reply.content)
                        cid = int(meta["partition-id"])
                    except (RecordError, KeyError, ValueError) as e:
                        log.warning("node %d: malformed query reply: %s", nid, e)
                        self.refused.add(nid)
                        continue
                    if meta.get("config-hash") != self.hash:
                        log.warning("node %d (partition %d) runs another config (hash %s != %s); ignored", nid, cid, meta.get("config-hash"), self.hash)
                        self.refused.add(nid)
                        continue
                    if cid in self.node_of and self.node_of[cid] in live:
                        log.warning("node %d also serves partition %d (already node %d); ignored", nid, cid, self.node_of[cid])
                        continue
                    self.node_of[cid] = nid
                    self.client_of[nid] = cid
            if len(self.node_of) >= self.cfg.num_clients or time.time() >= deadline:
                return sorted(self.node_of)
            time.sleep(0.5)

    # --- Strategy API ------------------------------------------------------------------------------
    def summary(self) -> None:
        log.info("deltamask %s: %d clients, %d per round, %d rounds, N=%d", self.cfg.method, self.cfg.num_clients,
                 self.cfg.clients_per_round, self.cfg.rounds, self.exp.net.num_masked)

    def global_arrays(self) -> ArrayRecord:
        """The global model held by the server (not sent: clients get ``method.downlink`` bytes)."""
        s = self.state
        return ArrayRecord({"theta": Array(s.theta), "head_weight": Array(s.head_weight), "head_bias": Array(s.head_bias)})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        t0 = time.time()
        wait = self.settings.node_wait_timeout if server_round == 1 else 0.0
        available = self.discover(grid, wait)
        if len(available) < self.cfg.num_clients:
            log.warning("round %d: %d of %d partitions connected (%s)", server_round, len(available), self.cfg.num_clients, available)
        selected = select_clients(self.cfg, server_round, available)
        msgs, down_bits, fl_rec, fl_wire = [], {}, 0, 0
        for cid in selected:
            payload = self.method.downlink(self.state, cid, server_round)
            down_bits[cid] = 8 * len(payload)
            content = pack_payload(payload, {"round": server_round, "client-id": cid, "config-hash": self.hash})
            msg = Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN, group_id=str(server_round))
            fl_rec += record_bytes(content)
            fl_wire += wire_bytes(msg)
            msgs.append(msg)
        self._round = {"t0": t0, "selected": selected, "down_bits": down_bits, "flower_down_record": fl_rec, "flower_down_wire": fl_wire,
                       "nodes": {self.node_of[c]: c for c in selected}}
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self._round
        by_client: dict[int, Reply] = {}
        failures: dict[int, str] = {}
        fl_rec = fl_wire = 0
        for msg in replies:
            cid = r["nodes"].get(int(msg.metadata.src_node_id))
            if cid is None:
                log.warning("round %d: reply from unexpected node %d ignored", server_round, msg.metadata.src_node_id)
                continue
            if msg.has_error():
                failures[cid] = f"ClientApp error {msg.error.code}: {_last_line(msg.error.reason)}"
                continue
            fl_rec += record_bytes(msg.content)
            fl_wire += wire_bytes(msg)
            try:
                meta = unpack_meta(msg.content)
                if "error" in meta:
                    failures[cid] = str(meta["error"])
                    continue
                if int(meta.get("round", -1)) != server_round or int(meta.get("client-id", -1)) != cid:
                    raise RecordError(f"reply is for round {meta.get('round')} client {meta.get('client-id')}")
                payload = unpack_payload(msg.content)
                metrics = msg.content.get(METRICS_KEY)
                by_client[cid] = Reply(cid, payload, int(meta["num-samples"]), {k: float(v) for k, v in (metrics or {}).items()})
            except (RecordError, KeyError, ValueError, TypeError) as e:
                failures[cid] = f"malformed reply: {type(e).__name__}: {e}"
        for cid in r["selected"]:
            if cid not in by_client and cid not in failures:
                failures[cid] = f"no reply within round-timeout ({self.settings.round_timeout:g} s)"
        replies_ok = [by_client[c] for c in r["selected"] if c in by_client]  # client order, as the local engine
        fail_list = [{"client": c, "reason": failures[c]} for c in r["selected"] if c in failures]
        for f in fail_list:
            log.warning("round %d: client %d dropped: %s", server_round, f["client"], f["reason"])
            self.method.delivered(self.state, f["client"], False)
        for rep in replies_ok:
            self.method.delivered(self.state, rep.client_id, True)
        info = self.method.aggregate(self.state, replies_ok, server_round)
        for d in info.get("dropped", []):
            log.warning("round %d: client %d dropped: %s", server_round, d["client"], d["reason"])
            self.method.delivered(self.state, d["client"], False)
        self.state.round = server_round
        r.update(replies=replies_ok, failures=fail_list, info=info, flower_up_record=fl_rec, flower_up_wire=fl_wire)
        m = MetricRecord({"num_replies": len(replies_ok), "num_aggregated": int(info.get("num_good", len(replies_ok))),
                          "skipped_update": int(bool(info.get("skipped", False)))})
        return self.global_arrays(), m

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # evaluation is server-side (evaluate_fn): the test set lives with the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Server-side evaluation and the round's bookkeeping (called by ``start`` after each round)."""
        if server_round == 0:
            return None
        r = self._round
        rnd = server_round
        evaluation = evaluate_global(self.exp, self.state, rnd) if (rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds) else None
        rec = round_record(self.exp, rnd, r["selected"], r["down_bits"], r["replies"], r["failures"], r["info"], evaluation, time.time() - r["t0"])
        rec["flower_downlink_record_bytes"] = r["flower_down_record"]
        rec["flower_uplink_record_bytes"] = r["flower_up_record"]
        rec["flower_downlink_message_bytes"] = r["flower_down_wire"]
        rec["flower_uplink_message_bytes"] = r["flower_up_wire"]
        append_jsonl(self.out / "metrics.jsonl", rec)
        save_state(self.out, self.state, {}, self.cfg.to_dict())
        self.progress.round_done(rec)
        return MetricRecord({k: float(v) for k, v in (evaluation or {}).items() if isinstance(v, (int, float, np.floating))})

"""The Flower transport: one ``train`` message per selected client over a Flower ``Grid``.

No round logic lives here (that is :mod:`deltamask.round`): this module finds out which SuperNode
serves which client id, turns ``{client: downlink bytes}`` into messages, and turns what comes back
into replies or typed failures:

* replies are matched to the messages they answer (``reply_to_message_id``), never by sender;
* a Flower error reply keeps its code and reason: ``NODE_UNAVAILABLE`` is ``node-lost``, a ClientApp
  exception or crash is ``error``; a node gone from the grid when the round times out is ``node-lost``,
  one still connected is ``timeout``;
* a reply that cannot be unpacked is ``transport``.

Node discovery: a ``query`` message to every new node id asks its ``partition-id`` (from its
``node_config``) and the hash of the config it resolved. A node that refuses (say, ``num-partitions``
contradicts the run) is reported by node id with its reason and left out; if no node at all joins
within ``node-wait-timeout`` the run fails (:class:`~deltamask.errors.RunFailed`).
"""

from __future__ import annotations

import logging
import re
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from ...config import Config
from ...errors import RunFailed
from ...methods import Failure, Reply
from ...transport import Exchange, Transport
from .client_app import METRICS_KEY
from .records import META_KEY, RecordError, pack_payload, record_bytes, unpack_meta, unpack_payload, wire_bytes
from .settings import FlowerSettings, config_hash

log = logging.getLogger("deltamask")

#: seconds between polls for replies (short: a round should not wait on the poll)
POLL_SECONDS = 0.1


#: Flower 1.42 wraps a ClientApp exception as "<class 'pkg.Name'>:<'message'>"
_FLWR_EXC = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.S)


def _last_line(text: str | None) -> str:
    """The last line of a traceback-like reason (the exception itself), as ``Name: message``."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "(no reason given)"
    m = _FLWR_EXC.match(last)
    return f"{m.group(1)}: {m.group(2)}" if m else last


class FlowerTransport(Transport):
    """Moves a round's bytes as Flower messages."""

    name = "flower"

    def __init__(self, grid: Grid, cfg: Config, settings: FlowerSettings) -> None:
        self.grid = grid
        self.cfg = cfg
        self.settings = settings
        self.hash = config_hash(cfg)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.refused: dict[int, str] = {}  # node id -> why it did not join

    # --- messaging ---------------------------------------------------------------------------------
    def _send(self, messages: list[Message], timeout: float) -> tuple[dict[str, Message], dict[str, Message]]:
        """Push ``messages``; return ({message id: sent message}, {message id: its reply}) once all
        are answered or ``timeout`` expires."""
        ids = list(self.grid.push_messages(messages))
        sent = {mid: msg for mid, msg in zip(ids, messages) if mid}
        replies: dict[str, Message] = {}
        deadline = time.time() + timeout
        pending = set(sent)
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    replies[mid] = reply
                    pending.discard(mid)
                else:
                    log.warning("a reply to unknown message %s from node %s was ignored", mid, reply.metadata.src_node_id)
            if not pending or time.time() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        for mid, msg in zip(ids, messages):
            if not mid:
                log.warning("Flower could not push the message to node %d", msg.metadata.dst_node_id)
        return sent, replies

    # --- nodes -------------------------------------------------------------------------------------
    def discover(self, wait: float) -> list[int]:
        """Ask new nodes which partition they serve; wait up to ``wait`` s for all ``num_clients``."""
        deadline = time.time() + wait
        while True:
            live = {int(n) for n in self.grid.get_node_ids()}
            for nid in [n for n in self.client_of if n not in live]:  # gone: forget the mapping
                cid = self.client_of.pop(nid)
                if self.node_of.get(cid) == nid:
                    del self.node_of[cid]
            new = sorted(live - set(self.client_of) - set(self.refused))
            if new:
                self._query(new, live)
            if len(self.node_of) >= self.cfg.num_clients or time.time() >= deadline:
                return sorted(self.node_of)
            time.sleep(0.5)

    def _query(self, nodes: list[int], live: set[int]) -> None:
        msgs = [Message(RecordDict({META_KEY: ConfigRecord({"config-hash": self.hash})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        sent, replies = self._send(msgs, timeout=max(10.0, min(self.settings.round_timeout, 60.0)))
        for mid, msg in sent.items():
            nid = int(msg.metadata.dst_node_id)
            reply = replies.get(mid)
            if reply is None:
                log.warning("node %d did not answer who it is; asked again later", nid)
                continue
            if reply.has_error():
                self._refuse(nid, _last_line(reply.error.reason))
                continue
            try:
                meta = unpack_meta(reply.content)
                cid = int(meta["partition-id"])
            except (RecordError, KeyError, ValueError) as e:
                self._refuse(nid, f"malformed answer to the query: {e}")
                continue
            if meta.get("config-hash") != self.hash:
                self._refuse(nid, f"it runs another config (hash {meta.get('config-hash')} != {self.hash}): give every node the same deltamask version and data")
                continue
            if cid in self.node_of and self.node_of[cid] in live:
                self._refuse(nid, f"partition {cid} is already served by node {self.node_of[cid]}: give each SuperNode its own partition-id")
                continue
            self.node_of[cid] = nid
            self.client_of[nid] = cid

    def _refuse(self, nid: int, reason: str) -> None:
        self.refused[nid] = reason
        log.warning("node %d refused to join: %s", nid, reason)

    # --- Transport ---------------------------------------------------------------------------------
    def start(self) -> None:
        joined = self.discover(self.settings.node_wait_timeout)
        if not joined:
            why = "; ".join(f"node {n}: {r}" for n, r in sorted(self.refused.items())) or "no SuperNode connected"
            raise RunFailed(f"no node joined within node-wait-timeout={self.settings.node_wait_timeout:g} s ({why})")
        if len(joined) < self.cfg.num_clients:
            log.warning("%d of %d partitions connected (%s); the run goes on with them", len(joined), self.cfg.num_clients, joined)

    def available(self, round_: int) -> list[int]:
        return self.discover(0.0)

    def exchange(self, round_: int, downlinks: dict[int, bytes]) -> Exchange:
        ex = Exchange()
        msgs, fl_rec, fl_wire = [], 0, 0
        for cid, payload in downlinks.items():
            content = pack_payload(payload, {"round": round_, "client-id": cid, "config-hash": self.hash})
            msg = Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN, group_id=str(round_))
            fl_rec += record_bytes(content)
            fl_wire += wire_bytes(msg)
            msgs.append(msg)
        sent, replies = self._send(msgs, timeout=self.settings.round_timeout)
        up_rec = up_wire = 0
        cid_of = {mid: self.client_of.get(int(m.metadata.dst_node_id), -1) for mid, m in sent.items()}
        for msg in msgs:
            if msg.metadata.message_id not in sent:
                cid = self.client_of[int(msg.metadata.dst_node_id)]
                ex.failures[cid] = Failure(cid, "Flower could not push the message", "transport", int(msg.metadata.dst_node_id))
        live = {int(n) for n in self.grid.get_node_ids()}
        for mid, msg in sent.items():
            cid, nid = cid_of[mid], int(msg.metadata.dst_node_id)
            reply = replies.get(mid)
            if reply is None:
                if nid in live:
                    ex.failures[cid] = Failure(cid, f"no reply within round-timeout ({self.settings.round_timeout:g} s)", "timeout", nid)
                else:
                    ex.failures[cid] = Failure(cid, f"node {nid} left during the round (no reply)", "node-lost", nid)
                continue
            if reply.has_error():
                code = int(reply.error.code)
                kind = "node-lost" if code == ErrorCode.NODE_UNAVAILABLE else "error"
                ex.failures[cid] = Failure(cid, f"Flower error {code} from node {nid}: {_last_line(reply.error.reason)}", kind, nid)
                continue
            up_rec += record_bytes(reply.content)
            up_wire += wire_bytes(reply)
            try:
                meta = unpack_meta(reply.content)
                if "error" in meta:
                    ex.failures[cid] = Failure(cid, str(meta["error"]), "error", nid)
                    continue
                if int(meta.get("round", -1)) != round_ or int(meta.get("client-id", -1)) != cid:
                    raise RecordError(f"reply is for round {meta.get('round')} client {meta.get('client-id')}")
                payload = unpack_payload(reply.content)
                metrics = reply.content.get(METRICS_KEY)
                ex.replies[cid] = Reply(cid, payload, int(meta["num-samples"]), {k: float(v) for k, v in (metrics or {}).items()})
            except (RecordError, KeyError, ValueError, TypeError) as e:
                ex.failures[cid] = Failure(cid, f"reply does not unpack: {type(e).__name__}: {e}", "transport", nid)
        ex.fields = {
            "flower_downlink_record_bytes": fl_rec,
            "flower_uplink_record_bytes": up_rec,
            "flower_downlink_message_bytes": fl_wire,
            "flower_uplink_message_bytes": up_wire,
        }
        return ex

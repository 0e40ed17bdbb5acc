"""The Flower transport: one ``train`` message per selected client over a Flower ``Grid``.

No round logic lives here (that is :mod:`deltamask.run.round`): this module finds out which SuperNode
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

Identity: a node's answer is not believed blindly.

* a ``partition-id`` that is not an ``int`` in ``[0, num_clients)`` is refused;
* a partition is bound, for the whole run, to the identity of the node that first claimed it, and that
  identity to that partition: a second claimant is refused (naming both node ids), even when the first node
  has left; the bound node coming back with the same identity is accepted again. The bindings are saved
  with the run state (:meth:`FlowerTransport.identities`) and restored on resume (:meth:`FlowerTransport.bind`).

The identity is the node's public key where the Grid reports one (``key:<sha256 of the key>``), else its
node id (``node:<id>``). In Flower 1.42 ``Grid.get_nodes()`` returns the SuperLink's ``NodeInfo`` records,
``public_key`` included (``Runtime.GetNodes`` -> ``LinkState.get_node_info``), and the SuperLink checks a
signature by that key on every Fleet call of a SuperNode (``NodeAuthMiddleware`` /
``NodeAuthServerInterceptor``), whether or not ``--enable-supernode-auth`` is on. With SuperNode
authentication the key is the one registered with ``flwr supernode register``, so it survives a restart of
the SuperNode; without it each ``flower-supernode`` process makes a fresh key pair when it registers (one
key, one node id), so a restarted SuperNode is a new identity and is refused for the partition it served.
Grids that report no key (test doubles) bind by node id.

Every refusal is also reported once in the next round's metrics line (``identity_refused``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from ...config import Config
from ...errors import CLIENT_FAILURE_KINDS, RunFailed, bounded_text
from ...methods import Failure, Reply
from ...run.transport import Exchange, Transport
from .client_app import METRICS_KEY
from .records import META_KEY, PayloadTooLarge, RecordError, pack_payload, record_bytes, unpack_meta, unpack_payload, wire_bytes
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


def _identity(nid: int, public_key: bytes) -> str:
    """A node's identity: its public key (signature-checked by the SuperLink) where the Grid reports one,
    else its node id."""
    return f"key:{hashlib.sha256(public_key).hexdigest()}" if public_key else f"node:{nid}"


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
        self.bound: dict[int, str] = {}  # client id -> identity bound to it for the whole run
        self.bound_node: dict[int, int] = {}  # client id -> node id of its bound identity, when known
        self.identity_of: dict[int, str] = {}  # node id -> its identity (see _identity)
        self._new_refusals: list[dict[str, Any]] = []  # for the next round's metrics line

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
            live = self._live_nodes()
            for nid in [n for n in self.client_of if n not in live]:  # gone: forget the mapping (not the binding)
                cid = self.client_of.pop(nid)
                if self.node_of.get(cid) == nid:
                    del self.node_of[cid]
            new = sorted(set(live) - set(self.client_of) - set(self.refused))
            if new:
                for nid in new:
                    self.identity_of[nid] = _identity(nid, live[nid])
                self._query(new)
            if len(self.node_of) >= self.cfg.num_clients or time.time() >= deadline:
                return sorted(self.node_of)
            time.sleep(0.5)

    def _live_nodes(self) -> dict[int, bytes]:
        """node id -> public key (b"" where the Grid reports none) of every node connected now."""
        get_nodes = getattr(self.grid, "get_nodes", None)
        if get_nodes is None:  # a Grid-like object without Flower's default get_nodes()
            return {int(n): b"" for n in self.grid.get_node_ids()}
        return {int(info.node_id): bytes(info.public_key or b"") for info in get_nodes()}

    def _query(self, nodes: list[int]) -> None:
        msgs = [Message(RecordDict({META_KEY: ConfigRecord({"config-hash": self.hash})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        sent, replies = self._send(msgs, timeout=max(10.0, min(self.settings.round_timeout, 60.0)))
        for mid, msg in sent.items():
            nid = int(msg.metadata.dst_node_id)
            reply = replies.get(mid)
            if reply is None:
                log.warning("node %d did not answer who it is; asked again later", nid)
                continue
            if reply.has_error() and int(reply.error.code) == ErrorCode.NODE_UNAVAILABLE:
                # the SuperLink answers for a node it lost: not the node's refusal (it may come back, and a
                # bound node must then be asked again)
                log.warning("node %d is unavailable; asked again if it comes back", nid)
                continue
            if reply.has_error():
                self._refuse(nid, _last_line(reply.error.reason))
                continue
            try:
                meta = unpack_meta(reply.content)
                claim = meta["partition-id"]
            except (RecordError, KeyError) as e:
                self._refuse(nid, f"malformed answer to the query: {e}")
                continue
            n = self.cfg.num_clients
            # an int, not a bool, a float or a string: a rogue answer is never coerced into some partition
            if type(claim) is not int or not 0 <= claim < n:
                self._refuse(nid, f"node {nid} claims partition-id {claim!r}, which is not an integer in 0..{n - 1} (num-clients={n})", claim)
                continue
            cid = claim
            if meta.get("config-hash") != self.hash:
                self._refuse(nid, f"it runs another config (hash {meta.get('config-hash')} != {self.hash}): give every node the same deltamask version and data", cid)
                continue
            ident = self.identity_of.get(nid) or _identity(nid, b"")
            bound = self.bound.get(cid)
            if bound is not None and bound != ident:
                other = self.bound_node.get(cid)
                holder = f"node {other}" if other is not None else "another node"
                self._refuse(nid, f"node {nid} ({ident}) claims partition {cid}, which is bound to {holder} ({bound}) for this run "
                                  "(the node that first claimed it): give each SuperNode its own partition-id", cid, other)
                continue
            mine = next((c for c, i in self.bound.items() if i == ident and c != cid), None)
            if mine is not None:
                self._refuse(nid, f"node {nid} ({ident}) claims partition {cid}, but it is bound to partition {mine} for this run", cid)
                continue
            if self.node_of.get(cid, nid) != nid:  # the same identity twice at once (a Grid would not allow it)
                self._refuse(nid, f"node {nid} claims partition {cid}, which node {self.node_of[cid]} serves now", cid, self.node_of[cid])
                continue
            self.bound[cid] = ident
            self.bound_node[cid] = nid
            self.node_of[cid] = nid
            self.client_of[nid] = cid

    def _refuse(self, nid: int, reason: str, claimed: Any = None, bound_node: int | None = None) -> None:
        reason = bounded_text(reason)  # it may quote the node: one printable, bounded line
        self.refused[nid] = reason
        if claimed is not None and (type(claimed) is not int):
            claimed = repr(claimed)[:80]  # what the node sent, JSON-safe
        self._new_refusals.append({"node": nid, "claimed": claimed, "bound_node": bound_node, "reason": reason})
        log.warning("node %d refused to join: %s", nid, reason)

    # --- identities --------------------------------------------------------------------------------
    def identities(self) -> dict[int, str]:
        """client id -> identity bound to it (``key:<sha256 hex>`` or ``node:<id>``) and, after ``@``, the node
        id that claimed it (so a refusal after resume still names both nodes); saved with the run state."""
        return {c: f"{i}@{self.bound_node[c]}" if i.startswith("key:") and c in self.bound_node else i for c, i in self.bound.items()}

    def bind(self, identities: dict[int, str]) -> None:
        """On resume: the interrupted run's bindings hold again (a partition's first claimant keeps it)."""
        for cid, saved in identities.items():
            cid = int(cid)
            ident, _, nid = str(saved).partition("@")
            self.bound[cid] = ident
            if nid.isdigit():
                self.bound_node[cid] = int(nid)
            elif ident.startswith("node:") and ident[len("node:"):].isdigit():
                self.bound_node[cid] = int(ident[len("node:"):])

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
            try:
                up_rec += record_bytes(reply.content)
                up_wire += wire_bytes(reply)
                meta = unpack_meta(reply.content)
                if "error" in meta:  # a node names its failure's kind only among the client kinds
                    kind = str(meta.get("error-kind", "error"))
                    ex.failures[cid] = Failure(cid, str(meta["error"]), kind if kind in CLIENT_FAILURE_KINDS else "error", nid)
                    continue
                if int(meta.get("round", -1)) != round_ or int(meta.get("client-id", -1)) != cid:
                    raise RecordError(f"reply is for round {meta.get('round')} client {meta.get('client-id')}")
                payload = unpack_payload(reply.content, self.max_reply_bytes)
                metrics = reply.content.get(METRICS_KEY)
                ex.replies[cid] = Reply(cid, payload, int(meta["num-samples"]), {k: float(v) for k, v in (metrics or {}).items()})
            except PayloadTooLarge as e:
                ex.failures[cid] = Failure(cid, f"rejected reply: {e}", "rejected", nid)
            except Exception as e:  # noqa: BLE001 - whatever a node sends, one reply never ends the run
                ex.failures[cid] = Failure(cid, f"reply does not unpack: {type(e).__name__}: {e}", "transport", nid)
        ex.fields = {
            "flower_downlink_record_bytes": fl_rec,
            "flower_uplink_record_bytes": up_rec,
            "flower_downlink_message_bytes": fl_wire,
            "flower_uplink_message_bytes": up_wire,
        }
        if self._new_refusals:  # nodes refused since the last round (start() included): once each
            ex.fields["identity_refused"], self._new_refusals = self._new_refusals, []
        return ex

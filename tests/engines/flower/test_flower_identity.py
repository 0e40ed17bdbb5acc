"""Which SuperNode may serve which client (issue 21, "Identity on Flower"): the transport does not believe a
node's ``partition-id`` blindly. An id outside ``[0, num_clients)`` (or not an int) is refused; a partition is
bound for the whole run (and across resume) to the identity of the node that first claimed it; every refusal
is named in ``self.refused`` and once in a round's metrics line (``identity_refused``). Fake grids only: no
Ray, no processes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.app.message_type import MessageType  # noqa: E402
from flwr.proto.node_pb2 import NodeInfo  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from dmtest import TINY  # noqa: E402
from deltamask.config import Config  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from deltamask.engines.flower.records import META_KEY  # noqa: E402
from deltamask.engines.flower.settings import FlowerSettings  # noqa: E402
from deltamask.engines.flower.transport import FlowerTransport  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from flower_loopback import InProcessGrid, LoopbackGrid  # noqa: E402

pytestmark = pytest.mark.flower
N = 4
CFG = Config(num_clients=N, clients_per_round=2)
NO_CLAIM = object()  # a node whose answer has no partition-id at all
UNAVAILABLE = object()  # a node the SuperLink lost: it answers for it with a NODE_UNAVAILABLE error


class ClaimGrid(InProcessGrid):
    """Nodes that answer the ``query`` with whatever they claim (honest or not), and the server's own
    config hash. ``keys``: node id -> the public key the SuperLink would report for it (none: b"")."""

    def __init__(self, claims: dict[int, Any], keys: dict[int, bytes] | None = None) -> None:
        self.claims = dict(claims)
        self.keys = dict(keys or {})
        self.replies: dict[str, Message] = {}
        self.queried: list[int] = []
        super().__init__()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.claims)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.claims]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid4().hex
            ids.append(mid)
            assert msg.metadata.message_type == MessageType.QUERY, "these tests exchange no train messages"
            nid = msg.metadata.dst_node_id
            self.queried.append(nid)
            if self.claims[nid] is UNAVAILABLE:
                self.replies[mid] = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
                continue
            meta = {"config-hash": msg.content[META_KEY]["config-hash"]}  # a rogue echoes the server's hash
            if self.claims[nid] is not NO_CLAIM:
                meta["partition-id"] = self.claims[nid]
            self.replies[mid] = Message(RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def transport(grid: Grid) -> FlowerTransport:
    return FlowerTransport(grid, CFG, FlowerSettings(node_wait_timeout=0.0, round_timeout=5.0))


def refusals(t: FlowerTransport) -> list[dict[str, Any]]:
    """What the next round's metrics line reports (an exchange with nobody selected)."""
    return t.exchange(1, {}).fields.get("identity_refused", [])


@pytest.mark.parametrize("claim", [-1, N, 2**62, "2", "two", 2.0, True, b"\x02", NO_CLAIM])
def test_partition_id_outside_the_run_or_not_an_int_is_refused(claim: Any) -> None:
    t = transport(ClaimGrid({7: 0, 9: claim}))
    assert t.discover(0.0) == [0]
    assert t.node_of == {0: 7} and t.client_of == {7: 0} and t.identities() == {0: "node:7"}
    assert set(t.refused) == {9}
    (rec,) = refusals(t)
    assert rec["node"] == 9 and rec["bound_node"] is None
    if claim is NO_CLAIM:
        assert "malformed answer" in t.refused[9] and rec["claimed"] is None
    else:
        assert "node 9 claims partition-id" in t.refused[9] and f"0..{N - 1}" in t.refused[9]
        assert repr(claim) in t.refused[9]
        assert rec["claimed"] == (claim if type(claim) is int else repr(claim))
    json.dumps(rec)  # it goes to metrics.jsonl as is


def test_forty_rogues_beside_four_honest_nodes() -> None:
    """Rogue node ids sort before and after the honest ones; half claim ids the run does not have, half the
    honest nodes' ids (after those were bound). Only the honest four serve."""
    honest = {500 + i: i for i in range(N)}
    out_of_range = [-1, N, N + 1, 10**6, 2**62, -(2**62), "0", "1", "x", 0.0, 1.5, True, False, b"\x00", "", 99, -5, 7, 8, 3.0]
    rogues_early = {100 + i: c for i, c in enumerate(out_of_range)}  # lower node ids: asked before the honest ones
    grid = ClaimGrid({**rogues_early, **honest})
    t = transport(grid)
    assert t.discover(0.0) == list(range(N))
    rogues_late = {900 + i: i % N for i in range(20)}  # arrive later, claiming the honest nodes' partitions
    grid.claims.update(rogues_late)
    assert t.available(2) == list(range(N))
    assert t.node_of == {c: n for n, c in honest.items()}
    assert t.identities() == {c: f"node:{n}" for n, c in honest.items()}
    assert set(t.refused) == set(rogues_early) | set(rogues_late)
    recs = {r["node"]: r for r in refusals(t)}
    assert set(recs) == set(rogues_early) | set(rogues_late)
    for nid, c in rogues_late.items():
        assert recs[nid]["claimed"] == c and recs[nid]["bound_node"] == 500 + c
    # each node is asked once: a refused node is not asked again, a bound one keeps its partition
    t.available(3)
    assert sorted(grid.queried) == sorted(grid.claims)


def test_second_claimant_is_refused_with_both_node_ids() -> None:
    t = transport(ClaimGrid({7: 1, 3: 0, 8: 1}))  # 7 and 8 claim partition 1 in the same batch: the first asked wins
    assert t.discover(0.0) == [0, 1]
    assert t.node_of == {0: 3, 1: 7}
    assert "node 8" in t.refused[8] and "node 7" in t.refused[8] and "partition 1" in t.refused[8] and "bound" in t.refused[8]
    assert refusals(t) == [{"node": 8, "claimed": 1, "bound_node": 7, "reason": t.refused[8]}]
    assert refusals(t) == []  # reported once: in the next round's line only


def test_partition_whose_node_left_cannot_be_claimed_by_a_new_node() -> None:
    grid = ClaimGrid({7: 1, 3: 0})
    t = transport(grid)
    t.discover(0.0)
    refusals(t)
    del grid.claims[7]  # node 7 leaves
    assert t.available(2) == [0]
    grid.claims[11] = 1  # a new node claims the orphaned partition
    assert t.available(3) == [0]
    assert 11 in t.refused and "node 11" in t.refused[11] and "node 7" in t.refused[11]
    assert refusals(t) == [{"node": 11, "claimed": 1, "bound_node": 7, "reason": t.refused[11]}]
    grid.claims[7] = 1  # the bound node comes back with the same identity: accepted again
    assert t.available(4) == [0, 1] and t.node_of[1] == 7
    assert refusals(t) == []


def test_a_bound_node_may_not_switch_partitions() -> None:
    grid = ClaimGrid({7: 1, 3: 0})
    t = transport(grid)
    t.discover(0.0)
    del grid.claims[7]
    t.available(2)
    grid.claims[7] = 2  # comes back claiming a free partition: partition 1 would be left without its node
    assert t.available(3) == [0]
    assert "bound to partition 1" in t.refused[7] and 2 not in t.identities()


def test_binding_survives_resume() -> None:
    t1 = transport(ClaimGrid({7: 1, 3: 0}))
    t1.discover(0.0)
    saved = json.loads(json.dumps({str(k): v for k, v in t1.identities().items()}))  # as the run state keeps it
    assert saved == {"0": "node:3", "1": "node:7"}
    grid = ClaimGrid({12: 1, 3: 0, 13: 2})  # after the restart: partition 1 claimed by a new node, 2 never bound
    t2 = transport(grid)
    t2.bind({int(k): v for k, v in saved.items()})
    assert t2.discover(0.0) == [0, 2]
    assert t2.refused.keys() == {12} and "node 12" in t2.refused[12] and "node 7" in t2.refused[12]
    assert t2.identities() == {0: "node:3", 1: "node:7", 2: "node:13"}
    assert refusals(t2)[0]["bound_node"] == 7
    grid.claims[7] = 1  # the node it was bound to is back
    assert t2.available(1) == [0, 1, 2] and t2.node_of[1] == 7


def test_with_public_keys_the_key_is_the_identity() -> None:
    """Where the Grid reports public keys (a SuperLink does), a node is bound by its key: the same key under
    a new node id (a registered SuperNode that restarted) keeps its partition; another key does not get it."""
    k7, k8 = b"-----BEGIN PUBLIC KEY-----seven", b"-----BEGIN PUBLIC KEY-----eight"
    grid = ClaimGrid({7: 1, 3: 0}, keys={7: k7, 3: b"k3"})
    t = transport(grid)
    t.discover(0.0)
    assert t.identities()[1] == f"key:{hashlib.sha256(k7).hexdigest()}@7"  # the key, and the node that claimed it
    saved = t.identities()
    t2 = transport(grid := ClaimGrid({8: 1, 70: 1, 3: 0}, keys={8: k8, 70: k7, 3: b"k3"}))
    t2.bind(saved)
    assert t2.discover(0.0) == [0, 1]
    assert t2.node_of[1] == 70 and set(t2.refused) == {8}
    assert "node 8" in t2.refused[8] and hashlib.sha256(k7).hexdigest() in t2.refused[8]
    (rec,) = refusals(t2)
    assert rec["node"] == 8 and rec["bound_node"] == 7  # both node ids, also after a resume


def test_a_bound_node_the_superlink_lost_is_asked_again() -> None:
    """Asked while the SuperLink has lost it (a NODE_UNAVAILABLE error answers for it), a node is not refused:
    the bound node of a resumed run (with authentication: same key, same node id) is accepted once back."""
    k7 = b"key seven"
    grid = ClaimGrid({7: UNAVAILABLE, 3: 0}, keys={7: k7, 3: b"k3"})
    t = transport(grid)
    t.bind({1: f"key:{hashlib.sha256(k7).hexdigest()}"})
    assert t.discover(0.0) == [0] and t.refused == {}
    grid.claims[7] = 1
    assert t.available(2) == [0, 1] and t.node_of[1] == 7 and t.refused == {}
    assert refusals(t) == []


def test_one_identity_on_two_live_nodes_serves_once() -> None:
    """A Grid that reports one key on two nodes at once (the SuperLink refuses a key already in use): the
    second is not given the partition the first serves."""
    t = transport(ClaimGrid({7: 1, 8: 1}, keys={7: b"k", 8: b"k"}))
    assert t.discover(0.0) == [1] and t.node_of == {1: 7}
    assert "node 7 serves now" in t.refused[8]


def test_rogues_refused_in_a_real_run_and_reported_in_metrics(tmp_path) -> None:
    """The real ServerApp and ClientApp over the loopback grid: 4 honest SuperNodes join; from round 2 on,
    40 rogue nodes answer the query with invented partition ids (in range: the honest ones'; out of range;
    not integers). Every round trains the honest nodes only, and round 2's line names every rogue."""
    defaults = {**TINY, "num-clients": N, "rounds": 3, "clients-per-round": N, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    honest_app = make_client_app(defaults)
    invented = [i % N for i in range(20)] + [-1, N, 10**9, "1", 1.0, True, -7, 12, "x", b"\x01"] * 2
    claims = {1000 + N + i: c for i, c in enumerate(invented)}

    def app(msg: Message, context):  # noqa: ANN001, ANN202
        if context.node_id not in claims:
            return honest_app(msg, context)
        if msg.metadata.message_type != MessageType.QUERY:
            raise RuntimeError("a rogue node got a train message")
        meta = {"partition-id": claims[context.node_id], "num-partitions": N, "config-hash": msg.content[META_KEY]["config-hash"]}
        return Message(RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)

    class LateRogues(LoopbackGrid):
        trained = False

        def get_node_ids(self) -> Iterable[int]:
            return list(self.node_ids if self.trained else self.node_ids[:N])

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            self.trained |= any(m.metadata.message_type == MessageType.TRAIN for m in messages)
            return super().push_messages(messages)

    grid = LateRogues(app, N + len(claims), node_config={i: {"num-partitions": N} for i in range(N + len(claims))})
    summary = run_server(grid, {}, defaults)
    assert summary["rounds_completed"] == 3
    r1, r2, r3 = read_jsonl(tmp_path / "metrics.jsonl")
    for r in (r1, r2, r3):
        assert r["selected"] == list(range(N)) and r["num_replies"] == N and r["failures"] == []
    assert "identity_refused" not in r1 and "identity_refused" not in r3
    recs = {r["node"]: r for r in r2["identity_refused"]}
    assert set(recs) == set(claims)
    for nid, c in claims.items():
        assert recs[nid]["claimed"] == (c if type(c) is int else repr(c)), (nid, recs[nid])
        assert f"node {nid}" in recs[nid]["reason"]
        if type(c) is int and 0 <= c < N:
            assert recs[nid]["bound_node"] == 1000 + c and f"node {1000 + c}" in recs[nid]["reason"]
    from deltamask.run.state import load_state

    state = load_state(tmp_path)[0]
    assert state.identities == {c: f"node:{1000 + c}" for c in range(N)}


def test_resumed_run_keeps_the_bindings(tmp_path) -> None:
    """The run stops after round 1; on resume partition 1 is claimed by a node with another id: refused (and
    recorded in round 2's line), while the other partitions go on with their nodes."""
    import deltamask.run.round as round_mod

    base = {**TINY, "rounds": 2, "clients-per-round": 3, "min-replies": 1, "out-dir": str(tmp_path), "node-wait-timeout": 0}
    real = round_mod._one_round
    calls = {"n": 0}

    def stop_after_one(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        if calls["n"] == 1:
            raise KeyboardInterrupt("SuperLink gone")
        calls["n"] += 1
        return real(*a, **kw)

    round_mod._one_round = stop_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            run_server(LoopbackGrid(make_client_app(base), 3), {}, base)
    finally:
        round_mod._one_round = real
    resumed = {**base, "resume": True}
    grid = LoopbackGrid(make_client_app(resumed), 3)
    grid.node_ids[1] = 2001  # partition 1's SuperNode is now another node
    grid.contexts[2001] = grid.contexts.pop(1001)
    run_server(grid, {}, resumed)
    r1, r2 = read_jsonl(tmp_path / "metrics.jsonl")
    assert r1["selected"] == [0, 1, 2] and r2["selected"] == [0, 2]
    (rec,) = r2["identity_refused"]
    assert (rec["node"], rec["claimed"], rec["bound_node"]) == (2001, 1, 1001)

"""A Grid that hands messages straight to a ClientApp in this process (test double, no Ray).

It exercises the real ServerApp code (``run_server``) and the real ClientApp handlers, with one
Flower ``Context`` per node (so ``context.state`` persists per node across rounds, as in Flower). Every
message crosses a real serialization boundary (``deflate`` -> ``inflate``), as on the wire.
``lose``: (round, node index) pairs whose replies never arrive (a client that times out).
``unavailable``: (round, node index) pairs answered, as the SuperLink does for a node it lost, by a
``NODE_UNAVAILABLE`` error reply whose sender is the SuperLink (node id 1), not the node.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def _roundtrip(msg: Message) -> Message:
    """Serialize and rebuild a message as Flower's transport does."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objs = {oid: o.deflate() for oid, o in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, objs, keep_object_contents=True)
    out.metadata.__dict__.update(msg.metadata.__dict__)
    return out


class InProcessGrid(Grid):
    """What every in-process test Grid needs: the ServerApp runtime's task identity, the run, and messages."""

    def __init__(self) -> None:
        from flwr.supercore.task_identity import TaskIdentity  # what the ServerApp runtime sets before main

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)


class LoopbackGrid(InProcessGrid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 lose: Iterable[tuple[int, int]] = (), node_config: dict[int, dict] | None = None,
                 unavailable: Iterable[tuple[int, int]] = ()) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=1, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {}).get(i, {})},
                         state=RecordDict(), run_config=dict(run_config or {}))
            for i, nid in enumerate(self.node_ids)
        }
        self.lose = set(lose)
        self.unavailable = set(unavailable)
        self.replies: dict[str, Message] = {}
        super().__init__()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            nid = msg.metadata.dst_node_id
            delivered = _roundtrip(msg)
            idx = self.node_ids.index(nid)
            if msg.metadata.group_id.isdigit() and (int(msg.metadata.group_id), idx) in self.unavailable:
                from flwr.common.constant import ErrorCode

                err = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=delivered)
                err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers, not the node
                self.replies[msg.metadata.message_id] = err
                continue
            try:
                reply = self.client_app(delivered, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 - what the SuperNode does with a raising ClientApp
                reply = Message(Error(code=2, reason=f"{type(e).__name__}: {e}"), reply_to=delivered)
            if msg.metadata.group_id.isdigit() and (int(msg.metadata.group_id), idx) in self.lose:
                continue
            self.replies[msg.metadata.message_id] = reply if reply.has_error() else _roundtrip(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

"""Flower's per-round floor (benchmark): each round the ServerApp sends every node an empty train message
and polls for the replies every 0.1 s (as deltamask's transport does); the ClientApp answers at once."""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, want = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    while len(nodes := list(grid.get_node_ids())) < want:
        time.sleep(0.5)
    seconds = []
    for r in range(1, rounds + 1):
        t0 = time.time()
        msgs = [Message(RecordDict({"r": ConfigRecord({"round": r})}), dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(r))
                for n in nodes[:want]]
        pending = set(grid.push_messages(msgs))
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
            time.sleep(0.1)
        seconds.append(time.time() - t0)
    with open(str(context.run_config["out"]), "w") as f:
        json.dump(seconds, f)

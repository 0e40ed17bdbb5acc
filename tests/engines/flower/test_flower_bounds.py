"""Sizes another party controls are bounded (issue 22): a reply's payload is capped (64 bits per masked scalar
and head parameter plus framing, :meth:`Method.max_reply_bytes`) before it is copied, and a node's error text is
kept as one printable line of bounded length. Through the Flower transport on a loopback grid, and at the
edges in unit tests."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.engines.flower import make_client_app, run_server  # noqa: E402
from deltamask.engines.flower.records import META_KEY, SMALL_PAYLOAD_BYTES, PayloadTooLarge, pack_payload, unpack_meta, unpack_payload  # noqa: E402
from deltamask.errors import MAX_REASON_CHARS, bounded_text  # noqa: E402
from deltamask.methods import Failure  # noqa: E402
from deltamask.methods.base import REPLY_OVERHEAD_BYTES  # noqa: E402
from deltamask.run.experiment import build_experiment  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from flower_loopback import LoopbackGrid  # noqa: E402

pytestmark = pytest.mark.flower


@pytest.mark.parametrize("size", [10, SMALL_PAYLOAD_BYTES + 10])  # a ConfigRecord and an ArrayRecord payload
def test_the_payload_cap_at_its_edge(size) -> None:
    content = pack_payload(bytes(size), {"round": 1})
    assert len(unpack_payload(content, max_bytes=size)) == size  # exactly at the cap: accepted
    assert len(unpack_payload(content)) == size  # no cap known: accepted
    with pytest.raises(PayloadTooLarge, match=f"payload of {size:,} bytes, over the cap of {size - 1:,}"):
        unpack_payload(content, max_bytes=size - 1)


def test_the_cap_is_derived_from_n_and_the_head() -> None:
    exp = build_experiment(tiny_config(), lambda s: None)
    c, d = exp.net.head.weight.shape
    assert exp.method.max_reply_bytes() == 8 * (exp.net.num_masked + c * (d + 1)) + REPLY_OVERHEAD_BYTES


def test_a_long_hostile_reason_is_one_bounded_printable_line() -> None:
    evil = "boom\n2026-12-06 INFO round 9: all good\x1b[2J\r" + "x" * 10**6 + "\nTheEnd: the exception"
    f = Failure(1, evil)
    assert f.reason.isprintable() and "\n" not in f.reason and "\x1b" not in f.reason
    assert f.reason.startswith("boom\\n2026-12-06 INFO round 9") and f.reason.endswith("TheEnd: the exception")
    assert len(f.reason) < MAX_REASON_CHARS + 200
    assert "characters left out" in f.reason
    short = "a" * MAX_REASON_CHARS  # exactly at the limit: kept whole
    assert bounded_text(short) == short and bounded_text(short + "b") != short + "b"


def _tampering(app, tamper):  # noqa: ANN001, ANN202
    def wrapped(msg: Message, context) -> Message:  # noqa: ANN001
        reply = app(msg, context)
        pid = int(context.node_config["partition-id"])
        return tamper(pid, msg, reply) or reply
    return wrapped


def test_flower_refuses_an_oversized_payload_and_bounds_a_nodes_error_text(tmp_path) -> None:
    defaults = {**TINY, "rounds": 2, "num-clients": 4, "clients-per-round": 4, "out-dir": str(tmp_path / "run")}
    cap = build_experiment(tiny_config(num_clients=4, clients_per_round=4), lambda s: None).method.max_reply_bytes()
    evil = "Traceback\n\x1b[31m" + "y" * 200_000 + "\nValueError: forged"

    def tamper(pid: int, msg: Message, reply: Message):  # noqa: ANN202
        if reply.has_error() or msg.metadata.message_type != "train":
            return None
        meta = unpack_meta(reply.content)
        if pid == 1:  # one byte past the cap
            return Message(pack_payload(bytes(cap + 1), meta), reply_to=msg)
        if pid == 2:  # exactly the cap: not refused for its size (it then fails to decode)
            return Message(pack_payload(bytes(cap), meta), reply_to=msg)
        if pid == 3:
            return Message(RecordDict({META_KEY: ConfigRecord({**meta, "error": evil})}), reply_to=msg)
        return None

    s = run_server(LoopbackGrid(_tampering(make_client_app(defaults), tamper), 4), {}, defaults)
    assert s["status"] == "completed"
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for r in recs:
        by = {f["client"]: f for f in r["failures"]}
        assert set(by) == {1, 2, 3}, r["failures"]
        assert by[1]["kind"] == "rejected" and f"payload of {cap + 1:,} bytes, over the cap of {cap:,}" in by[1]["reason"]
        assert "over the cap" not in by[2]["reason"]
        assert by[3]["reason"].isprintable() and by[3]["reason"].endswith("ValueError: forged")
        assert len(by[3]["reason"]) < MAX_REASON_CHARS + 200
    log = (tmp_path / "run" / "summary.json").read_text()
    assert "\\u001b" not in log and "y" * 5000 not in log

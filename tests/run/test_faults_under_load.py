"""Faults under load (issue 10): every round one in four selected clients fails, each round a different
way (raises, hangs past round-timeout, or sends a truncated, oversized, wrong-codec, wrong-N or 2^32-n
payload). The run finishes; every failure is in metrics.jsonl with its reason and kind; each round's
update equals the aggregation of its healthy replies alone (the run equals one where the same clients
simply raise); and the server's peak memory while aggregating stays flat (tracemalloc, which numpy
reports to). The Flower deployment version is in tests/engines/flower/test_flower_deploy.py."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file

import deltamask.engines.local as local
from dmtest import VirtualClock, tiny_config
from deltamask.engines.local import run_local
from deltamask.testing.faults import forge
from deltamask.run.metrics import TIMING_KEYS, read_jsonl

#: round -> (client, fault); clients_per_round = num_clients = 4, so one in four fails every round
KINDS = ["raise", "hang", "truncated", "oversized", "wrong-codec", "wrong-n", "n32"]
SCRIPT = {r: ((r * 3) % 4, KINDS[(r - 1) % len(KINDS)]) for r in range(1, 9)}
EXPECTED_KIND = {"raise": "error", "hang": "timeout"}


CLOCK = VirtualClock()  # the local round timeout's time: only a scripted hang advances it


def faulty(rnd: int, cid: int):  # noqa: ANN201
    if SCRIPT.get(rnd, (None,))[0] != cid:
        return None
    kind = SCRIPT[rnd][1]
    if kind == "raise":
        raise RuntimeError(f"scripted fault: client {cid} raises in round {rnd}")
    if kind == "hang":
        CLOCK.now += 60.0
        return None
    return lambda payload: forge(kind, payload)


def raising(rnd: int, cid: int) -> None:
    if SCRIPT.get(rnd, (None,))[0] == cid:
        raise RuntimeError("the reference: this client fails plainly")


def comparable(rec: dict) -> dict:
    # bytes that arrived count even when the reply is then dropped, so the byte fields differ; the
    # downlink differs too (a failed client's cache is resent); everything the update produces must not
    drop = set(TIMING_KEYS) | {"failures", "num_replies", "clients"}
    return {k: v for k, v in rec.items() if k not in drop and "downlink" not in k and "uplink" not in k}


@pytest.mark.parametrize("method", ["deltamask", "fedpm", "fedavg"])
def test_one_in_four_clients_fails_each_round_a_different_way(tmp_path, monkeypatch, method) -> None:
    monkeypatch.setattr(local, "time", CLOCK)
    peaks: dict[str, list[int]] = {"faulty": [], "reference": []}
    which = ["faulty"]

    cfg = tiny_config(method=method, rounds=8, num_clients=4, clients_per_round=4, min_replies=2)
    from deltamask.run.experiment import build_experiment

    for name, hook in (("faulty", faulty), ("reference", raising)):
        which[0] = name
        exp = build_experiment(cfg)
        inner = exp.method.aggregate

        def measured(state, replies, round_, _inner=inner, _name=name):  # noqa: ANN001, ANN202
            tracemalloc.start()
            try:
                return _inner(state, replies, round_)
            finally:
                peaks[_name].append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

        exp.method.aggregate = measured
        run_local(cfg, tmp_path / name, fault=hook, experiment=exp, round_timeout=30.0)

    recs = read_jsonl(tmp_path / "faulty" / "metrics.jsonl")
    ref = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    assert len(recs) == 8
    for r in recs:
        cid, kind = SCRIPT[r["round"]]
        assert [f["client"] for f in r["failures"]] == [cid], r["failures"]
        f = r["failures"][0]
        assert f["kind"] == EXPECTED_KIND.get(kind, "malformed"), (kind, f)
        assert f["reason"], f
        good = r["num_replies"] - sum(f["kind"] == "malformed" for f in r["failures"])  # a malformed reply arrived
        assert good == 3 and not r["skipped_update"], r
    # nothing from a failed client leaks in: the same rounds as when those clients simply fail
    assert [comparable(r) for r in recs] == [comparable(r) for r in ref]
    a, b = load_file(str(tmp_path / "faulty" / "state.safetensors")), load_file(str(tmp_path / "reference" / "state.safetensors"))
    for k in b:
        if k.startswith("server/"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # flat memory: a 2^32-n header is refused before anything is allocated
    ceiling = 2 * max(peaks["reference"]) + (1 << 20)
    assert max(peaks["faulty"]) <= ceiling, (peaks, ceiling)
    print(f"\n{method}: aggregate peak bytes per round, faulty {peaks['faulty']}, reference {peaks['reference']}")

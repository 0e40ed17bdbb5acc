"""Issue 21's Sybil cell: partition claims on the Flower transport, measured end to end.

    python benchmarks/bench_sybil.py --out runs/sybil                       # the quick setup, seeds 0-2
    python benchmarks/bench_sybil.py --out runs/sybil --set rounds=30 ...   # any config keys on top

The real ServerApp (``run_server``) and the real ClientApp (``make_client_app``) over the in-process loopback
grid of the Flower tests (``tests/engines/flower/flower_loopback.py``: every message is serialized and rebuilt
as on the wire, one Flower ``Context`` per node). 10 honest SuperNodes, one per partition, every partition
selected every round. Per seed and ``--malicious M`` (the partitions drawn from the seed as in
``bench_attacks.py``):

- ``honest``: the 10 honest nodes alone;
- ``sybil-late``: from round 2 on, M rogue nodes claim the M partitions (already bound to their honest
  nodes) and M more claim ids the run does not have (out of range, not integers). Expected: every claim
  refused and named in round 2's ``identity_refused``, and the run bit for bit the honest one;
- ``sybil-early``: M rogue nodes with lower node ids than the honest ones are asked first and claim the M
  partitions before their honest nodes do. Without SuperNode authentication the first claim binds (the issue's
  rule): the honest nodes are refused, named with both node ids, and the rogues serve those partitions, sending
  garbage in every round (the ``malformed`` fault: they hold no data), which is rejected. What it costs is those
  partitions' data, as for M rejected clients; with SuperNode authentication on (the documented deployment)
  the SuperLink admits no unknown key, so this case needs a stolen node key.

One line per run in ``OUT/runs.jsonl`` (rerunning skips runs already there); the table goes to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engines" / "flower"), str(ROOT / "benchmarks")]

from bench_attacks import malicious_ids  # noqa: E402

QUICK = {"dataset": "digits", "image_size": 32, "train_samples": 600, "test_samples": 300, "rounds": 5,
         "head_warmup_rounds": 2, "masked_blocks": 2}
N = 10
INVALID = [-1, N, 10**9, "1", 1.5, True]  # ids the run does not have


def run_one(case: str, seed: int, bad: list[int], base) -> dict:  # noqa: ANN001 - base: a deltamask Config
    from collections.abc import Iterable

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flower_loopback import LoopbackGrid

    from deltamask.engines.flower import make_client_app, run_server
    from deltamask.engines.flower.records import META_KEY
    from deltamask.run.metrics import read_jsonl

    out = Path(tempfile.mkdtemp(prefix="dm-sybil-"))
    rounds = base.rounds
    defaults = {**base.to_dict(), "seed": seed, "num_clients": N, "clients_per_round": N, "progress": False,
                "out-dir": str(out / "run"), "node-wait-timeout": 0}
    client_app = make_client_app(defaults)  # an early rogue runs it too, with a scripted garbage reply (its node_config)
    late = {2000 + j: c for j, c in enumerate([*bad, *INVALID[: len(bad)]])} if case == "sybil-late" else {}
    early = {100 + j: c for j, c in enumerate(bad)} if case == "sybil-early" else {}

    def late_app(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type != MessageType.QUERY:
            raise RuntimeError("a refused rogue node got a train message")
        meta = {"partition-id": late[context.node_id], "num-partitions": N, "config-hash": msg.content[META_KEY]["config-hash"]}
        return Message(RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)

    def app(msg: Message, context: Context) -> Message:
        if context.node_id in late:
            return late_app(msg, context)
        return client_app(msg, context)

    class Grid(LoopbackGrid):
        trained = False

        def get_node_ids(self) -> Iterable[int]:
            return [n for n in self.node_ids if n not in late or self.trained]

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            self.trained |= any(m.metadata.message_type == MessageType.TRAIN for m in messages)
            return super().push_messages(messages)

    grid = Grid(app, N)
    garbage = ",".join(f"malformed@{r}" for r in range(1, rounds + 1))
    for nid, c in {**early, **late}.items():
        cfg = {"partition-id": c, "num-partitions": N}
        if nid in early:
            cfg["test-fault"] = garbage
        grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(), run_config={})
    grid.node_ids = sorted([*early, *grid.node_ids, *late])  # lower node ids are asked first
    t0 = time.time()
    summary = run_server(grid, {}, defaults, out_root=out)
    wall = time.time() - t0
    recs = read_jsonl(out / "run" / "metrics.jsonl")
    accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
    refused = {r2["node"]: r2 for r in recs for r2 in r.get("identity_refused", [])}
    rejected = sorted({f["client"] for r in recs for f in r["failures"] if f["kind"] in ("rejected", "malformed")})
    model = out / "run" / "model.safetensors"
    return {
        "final_accuracy": accs[-1] if accs else None, "trajectory": accs, "status": summary.get("status"),
        "refused": sorted(refused), "refused_claims": {str(k): v.get("claimed") for k, v in refused.items()},
        "refused_bound_to": {str(k): v.get("bound_node") for k, v in refused.items()},
        "rogues": sorted([*early, *late]), "rejected": rejected, "selected": [r["selected"] for r in recs],
        "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else None, "wall": wall,
    }


def tabulate(rows: list[dict]) -> str:
    lines = ["| case | malicious | seeds | final acc (mean ± sd) | Δ vs honest, points (per seed) | model identical to honest | "
             "rogue claims refused | honest nodes refused | partitions rejected |", "|---|---|---|---|---|---|---|---|---|"]
    honest = {r["seed"]: r for r in rows if r["case"] == "honest"}
    keys = []
    for r in rows:
        if (r["case"], r["m"]) not in keys:
            keys.append((r["case"], r["m"]))
    for case, m in keys:
        rs = [r for r in rows if (r["case"], r["m"]) == (case, m)]
        accs = [r["final_accuracy"] for r in rs]
        acc = f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else f"{accs[0]:.3f}"
        deltas = [100 * (r["final_accuracy"] - honest[r["seed"]]["final_accuracy"]) for r in rs if r["seed"] in honest]
        d = f"{statistics.mean(deltas):+.1f} ({' / '.join(f'{x:+.1f}' for x in deltas)})" if deltas and case != "honest" else ""
        same = sum(r["model_sha256"] == honest.get(r["seed"], {}).get("model_sha256") for r in rs)
        rogue = sum(len(set(r["rogues"]) & set(r["refused"])) for r in rs)
        rogues = sum(len(r["rogues"]) for r in rs)
        hon = sum(len(set(r["refused"]) - set(r["rogues"])) for r in rs)
        rej = sum(len(r["rejected"]) for r in rs)
        lines.append(f"| {case} | {m}/{N} | {len(rs)} | {acc} | {d} | {same} of {len(rs)} | {rogue} of {rogues} | {hon} | {rej} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="key=value config overrides on top of the quick setup")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--malicious", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--table", action="store_true", help="only tabulate OUT/runs.jsonl")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    if not a.table:
        from deltamask.config import build_config, parse_sets

        base = build_config(parse_sets(a.set), base=build_config(QUICK), from_strings=True)  # a wrong key is refused
        done = {(r["seed"], r["case"], r["m"]) for r in map(json.loads, open(log))} if log.exists() else set()
        for seed in a.seeds:
            for case, m in [("honest", 0), *[(c, m) for m in a.malicious for c in ("sybil-late", "sybil-early")]]:
                if (seed, case, m) in done:
                    continue
                bad = malicious_ids(seed, N, m)
                res = run_one(case, seed, bad, base)
                with open(log, "a") as f:
                    f.write(json.dumps({"seed": seed, "case": case, "m": m, "malicious": bad, **res}) + "\n")
                print(f"seed {seed} {case:12s} {m}/{N} acc {res['final_accuracy']} {res['status']} refused {res['refused']} "
                      f"rejected {res['rejected']} {res['wall']:.0f}s", file=sys.stderr, flush=True)
    table = tabulate([json.loads(line) for line in open(log)] if log.exists() else [])
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worked example (docs/architecture.md, "add a transport"): a lossy network for the simulator.

A transport moves one round's bytes and nothing more: the round driver (``deltamask.run.round``) selects the
clients, builds every downlink, aggregates and records; the transport delivers each client's bytes and
returns, per client, a reply or a typed failure. This one wraps the local engine and loses each reply with
probability ``drop`` (seeded by the round and client, so reruns agree): the stragglers and dropped links of a
real deployment, to see what they cost. A lost reply is a ``timeout`` failure, as a Flower server records a
node that never answered; the driver then forgets what that client holds and re-sends it in full next time.

    python examples/extend/add_transport.py     # the same run over a perfect and a lossy network (~40 s)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from deltamask.config import Config
from deltamask.engines.local import LocalTransport
from deltamask.fl import seeding
from deltamask.methods import Failure
from deltamask.run.experiment import build_experiment
from deltamask.run.round import Progress, run_rounds
from deltamask.run.transport import Exchange, Transport


class LossyTransport(Transport):
    name = "lossy"

    def __init__(self, exp, drop: float) -> None:  # type: ignore[no-untyped-def]
        self.local, self.drop, self.seed = LocalTransport(exp), drop, exp.cfg.seed

    def exchange(self, round_: int, downlinks: dict[int, bytes]) -> Exchange:
        ex = self.local.exchange(round_, {cid: bytes(p) for cid, p in downlinks.items()})  # bytes only cross
        lost = [cid for cid in sorted(ex.replies)
                if seeding.derive_seed(self.seed, round_, cid, "network-loss") % 1000 < 1000 * self.drop]
        for cid in lost:
            del ex.replies[cid]
            ex.failures[cid] = Failure(cid, "reply lost on the network", "timeout")
        ex.fields["lost_replies"] = lost  # a transport's own fields join the round's metrics line
        return ex

    # the clients' caches live in the wrapped local engine: forget, persist and restore them there
    def forget(self, client_id: int) -> None:
        self.local.forget(client_id)

    def client_states(self) -> dict[int, dict[str, Any]]:
        return self.local.client_states()

    def restore(self, client_states: dict[int, dict[str, Any]]) -> set[int]:
        return self.local.restore(client_states)


def run_lossy(cfg: Config, out_dir: str | Path, drop: float) -> dict:
    exp = build_experiment(cfg)
    return run_rounds(exp, LossyTransport(exp, drop), out_dir, progress=Progress(cfg.progress, cfg.rounds))


def main(out_dir: str | None = None, **overrides: object) -> dict[float, dict]:
    from deltamask.config import build_config

    cfg = build_config({"dataset": "digits", "image_size": 32, "rounds": 4, "head_warmup_rounds": 1, "num_clients": 6,
                        "clients_per_round": 4, "train_samples": 400, "test_samples": 200, "masked_blocks": 2,
                        "progress": False, **overrides})
    out: dict[float, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for drop in (0.0, 0.4):
            out[drop] = run_lossy(cfg, Path(out_dir or tmp) / f"drop{drop}", drop)
            print(f"drop {drop}: {out[drop]['status']}, final accuracy {out[drop]['final_accuracy']:.3f}")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

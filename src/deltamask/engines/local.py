"""The local in-process transport: the embedded default engine. Deterministic, no Ray.

Clients run one after another in this process; their caches (last theta / head received) live here
and are saved with the run state, so a resumed run continues with them. The round itself is
:func:`deltamask.run.round.run_rounds`'s. A client that raises fails with its reason. With
``round_timeout`` (the ``round-timeout`` engine key, when a run sets it) a client whose update took
longer is dropped as ``timeout``, as a Flower server would drop it; unset, local clients take as long as
they need. ``fault`` (tests only) is called as ``fault(round, client)`` before each update and may raise,
sleep, or return bytes to send in place of the real reply, or a function of the real reply's payload
that returns the bytes to send (a misbehaving client).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..run.experiment import Experiment, build_experiment
from ..errors import failure_kind
from ..methods import ClientContext, ClientData, ClientFailure, Failure, Reply
from ..run.round import Progress, resume_config, run_rounds
from ..run.tracking import require as require_tracking
from ..run.transport import Exchange, Transport

log = logging.getLogger("deltamask")

#: test hook: called as fault(round, client_id) before a client's update; may raise, sleep, or return
#: bytes that replace the client's reply payload, or a function payload -> bytes to send instead, or a
#: ``deltamask.testing.faults.Attack`` (poisons the client's data and/or forges its whole reply)
FaultHook = Callable[[int, int], "bytes | Callable[[bytes], bytes] | None"]

__all__ = ["LocalTransport", "resume_config", "run_local"]


class LocalTransport(Transport):
    """Calls ``method.client_update`` in this process for each selected client."""

    name = "local"

    def __init__(self, exp: Experiment, fault: FaultHook | None = None, round_timeout: float | None = None) -> None:
        if round_timeout is not None and not round_timeout > 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        self.exp = exp
        self.fault = fault
        self.round_timeout = round_timeout
        self.states: dict[int, dict[str, Any]] = {}
        self.data: dict[int, ClientData] = {}

    def exchange(self, round_: int, downlinks: dict[int, bytes]) -> Exchange:
        ex = Exchange()
        for cid, payload in downlinks.items():
            data = self.data.get(cid) or self.data.setdefault(cid, self.exp.client_data(cid))
            ctx = ClientContext(round_, cid, self.exp.cfg.seed, self.states.setdefault(cid, {}))
            t0 = time.monotonic()
            try:
                forged = self.fault(round_, cid) if self.fault is not None else None
                if data.num_samples == 0:
                    raise ClientFailure("client has no training data")
                attack = forged if hasattr(forged, "forge_reply") else None  # deltamask.testing.faults.Attack (tests)
                reply = self.exp.method.client_update(payload, attack.poison_data(data) if attack else data, ctx)
                if attack is not None:
                    reply = attack.forge_reply(reply, ctx, self.exp.method)
                elif forged is not None:
                    sent = forged(reply.payload) if callable(forged) else forged
                    reply = Reply(cid, sent, reply.num_samples, reply.metrics)
            except Exception as e:  # noqa: BLE001 - a crashing client must not end the run
                log.debug("%s", traceback.format_exc())
                ex.failures[cid] = Failure(cid, f"{type(e).__name__}: {e}", failure_kind(e))
                continue
            took = time.monotonic() - t0
            if self.round_timeout is not None and took > self.round_timeout:
                ex.failures[cid] = Failure(cid, f"no reply within round-timeout {self.round_timeout:g} s (took {took:.1f} s)", "timeout")
                continue
            ex.replies[cid] = reply
        return ex

    def forget(self, client_id: int) -> None:
        self.states.pop(client_id, None)

    def client_states(self) -> dict[int, dict[str, Any]]:
        return self.states

    def restore(self, client_states: dict[int, dict[str, Any]]) -> set[int]:
        self.states = {int(c): dict(s) for c, s in client_states.items()}
        return set(self.states)


def run_local(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    fault: FaultHook | None = None,
    stop_after: int | None = None,
    experiment: Experiment | None = None,
    overwrite: bool = True,
    round_timeout: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment in-process; returns the summary. ``stop_after`` ends the run
    after that round without finishing it (to test resume). ``overwrite=False`` refuses an output
    folder that already holds a run (the CLI's default for a named ``--out``). ``round_timeout``:
    drop a client whose update takes longer (seconds; None: no limit)."""
    require_tracking(cfg)  # before the experiment is built: a missing tracker library costs nothing
    progress = Progress(cfg.progress, cfg.rounds)
    exp = experiment or build_experiment(cfg, progress.say)
    transport = LocalTransport(exp, fault, round_timeout)
    return run_rounds(exp, transport, out_dir, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress)

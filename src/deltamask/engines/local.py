"""The local in-process transport: the embedded default engine. Deterministic, no Ray.

Clients run one after another in this process; their caches (last theta / head received) live here
and are saved with the run state, so a resumed run continues with them. The round itself is
:func:`deltamask.round.run_rounds`'s. A client that raises fails with its reason; ``fault`` (tests
only) is called as ``fault(round, client)`` before each update and may raise, or return bytes to send
in place of the real reply (a misbehaving client).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..experiment import Experiment, build_experiment
from ..methods import ClientContext, ClientData, ClientFailure, Failure, Reply
from ..round import Progress, resume_config, run_rounds
from ..transport import Exchange, Transport

log = logging.getLogger("deltamask")

#: test hook: called as fault(round, client_id) before a client's update; may raise, or return
#: bytes that replace the client's reply payload
FaultHook = Callable[[int, int], "bytes | None"]

__all__ = ["LocalTransport", "resume_config", "run_local"]


class LocalTransport(Transport):
    """Calls ``method.client_update`` in this process for each selected client."""

    name = "local"

    def __init__(self, exp: Experiment, fault: FaultHook | None = None) -> None:
        self.exp = exp
        self.fault = fault
        self.states: dict[int, dict[str, Any]] = {}
        self.data: dict[int, ClientData] = {}

    def exchange(self, round_: int, downlinks: dict[int, bytes]) -> Exchange:
        ex = Exchange()
        for cid, payload in downlinks.items():
            data = self.data.get(cid) or self.data.setdefault(cid, self.exp.client_data(cid))
            ctx = ClientContext(round_, cid, self.exp.cfg.seed, self.states.setdefault(cid, {}))
            try:
                forged = self.fault(round_, cid) if self.fault is not None else None
                if data.num_samples == 0:
                    raise ClientFailure("client has no training data")
                reply = self.exp.method.client_update(payload, data, ctx)
                if forged is not None:
                    reply = Reply(cid, forged, reply.num_samples, reply.metrics)
                ex.replies[cid] = reply
            except Exception as e:  # noqa: BLE001 - a crashing client must not end the run
                log.debug("%s", traceback.format_exc())
                ex.failures[cid] = Failure(cid, f"{type(e).__name__}: {e}", "error")
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
) -> dict[str, Any]:
    """Run (or resume) an experiment in-process; returns the summary. ``stop_after`` ends the run
    after that round without finishing it (to test resume). ``overwrite=False`` refuses an output
    folder that already holds a run (the CLI's default for a named ``--out``)."""
    progress = Progress(cfg.progress, cfg.rounds)
    exp = experiment or build_experiment(cfg, progress.say)
    return run_rounds(exp, LocalTransport(exp, fault), out_dir, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress)

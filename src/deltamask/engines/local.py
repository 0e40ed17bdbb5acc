"""The local in-process simulator: the embedded default engine. Deterministic, no Ray.

Each round: select K clients from (seed, round); for each, ``method.downlink`` -> bytes ->
``method.client_update`` -> bytes; then ``method.aggregate``; evaluate; append one line to
``metrics.jsonl``; write the run state atomically. A client that raises is dropped from the round
with its reason logged; the round aggregates the rest. ``resume=True`` continues from the last
written state and ends with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..config import Config, ConfigError, build_config
from ..experiment import Experiment, build_experiment
from ..methods import ClientContext, ClientFailure, Reply
from ..metrics import append_jsonl, truncate_metrics
from ..state import load_state, save_state
from .common import Progress, evaluate_global, finish_run, round_record, select_clients, write_config

log = logging.getLogger("deltamask")

#: keys that may differ when resuming (they do not change the computation)
RESUME_OVERRIDABLE = ("rounds", "progress", "device")

#: test hook: called as fault(round, client_id) before a client's update; may raise
FaultHook = Callable[[int, int], None]


def resume_config(out: Path, overrides: dict[str, Any]) -> Config:
    """The saved config of a run, with only the keys that do not change the result overridable."""
    _, _, saved = load_state(out)
    bad = [k for k in overrides if k.replace("-", "_") not in RESUME_OVERRIDABLE]
    if bad:
        raise ConfigError(f"cannot change {', '.join(bad)} when resuming; only {', '.join(RESUME_OVERRIDABLE)} may change")
    cfg = build_config(saved)
    return build_config(overrides, base=cfg, from_strings=True)


def run_local(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    fault: FaultHook | None = None,
    stop_after: int | None = None,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment in-process; returns the summary. ``stop_after`` ends the run
    after that round without finishing it (to test resume)."""
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(cfg.progress, cfg.rounds)
    exp = experiment or build_experiment(cfg, progress.say)
    method = exp.method
    if resume:
        state, client_states, _ = load_state(out)
        truncate_metrics(out / "metrics.jsonl", state.round)
        progress.say(f"resuming after round {state.round}")
    else:
        state = method.init_state()
        client_states = {}
        (out / "metrics.jsonl").write_text("")
        write_config(out, cfg)
    progress.say(
        f"{cfg.method} on {cfg.model} / {cfg.dataset}: N={exp.net.num_masked:,} masked of "
        f"{exp.net.num_backbone_params:,} backbone params, {cfg.num_clients} clients, {cfg.clients_per_round}/round"
    )
    data_cache: dict[int, Any] = {}
    for rnd in range(state.round + 1, cfg.rounds + 1):
        t0 = time.time()
        selected = select_clients(cfg, rnd)
        replies: list[Reply] = []
        failures: list[dict[str, Any]] = []
        down_bits: dict[int, int] = {}
        for i, cid in enumerate(selected):
            progress.clients(rnd, i, len(selected))
            payload = method.downlink(state, cid, rnd)
            down_bits[cid] = 8 * len(payload)
            data = data_cache.get(cid) or data_cache.setdefault(cid, exp.client_data(cid))
            ctx = ClientContext(rnd, cid, cfg.seed, client_states.setdefault(cid, {}))
            try:
                if fault is not None:
                    fault(rnd, cid)
                if data.num_samples == 0:
                    raise ClientFailure("client has no training data")
                reply = method.client_update(payload, data, ctx)
                replies.append(reply)
                method.delivered(state, cid, True)
            except Exception as e:  # noqa: BLE001 - a crashing client must not end the run
                reason = f"{type(e).__name__}: {e}"
                log.warning("round %d: client %d dropped: %s", rnd, cid, reason)
                log.debug("%s", traceback.format_exc())
                failures.append({"client": cid, "reason": reason})
                client_states.pop(cid, None)
                method.delivered(state, cid, False)
        info = method.aggregate(state, replies, rnd)
        for d in info.get("dropped", []):
            method.delivered(state, d["client"], False)
            client_states.pop(d["client"], None)
        state.round = rnd
        evaluation = evaluate_global(exp, state, rnd) if (rnd % cfg.eval_every == 0 or rnd == cfg.rounds) else None
        rec = round_record(exp, rnd, selected, down_bits, replies, failures, info, evaluation, time.time() - t0)
        append_jsonl(out / "metrics.jsonl", rec)
        save_state(out, state, client_states, cfg.to_dict())
        progress.round_done(rec)
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_after": rnd}
    return finish_run(out, exp, state, started)

"""THE round, written once for every engine.

    select -> downlink -> transport.exchange -> aggregate -> evaluate -> record -> save

:func:`run_rounds` drives a whole run over a :class:`~deltamask.run.transport.Transport`: the
local engine moves the bytes in-process, Flower moves them as messages; neither holds round logic.
Per round: ``K`` clients are drawn from ``(seed, round)`` among those the transport can reach;
``method.downlink`` gives each its bytes; the transport returns a reply or a typed
:class:`~deltamask.methods.Failure` per client; ``method.aggregate`` updates the server state from the
good replies alone; the global model is evaluated; one line goes to ``metrics.jsonl`` and the state is
written atomically (``state.safetensors``), so ``resume`` continues exactly where the run stopped.

A run *fails* (summary ``status: failed`` with the reason, no ``model.safetensors``, :class:`RunFailed`
raised) when ``max_skipped_rounds`` consecutive rounds get no update (fewer than ``min_replies`` good
replies), when it ends without a single update, or when the transport cannot start (no node joined).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fl import seeding
from ..fl.training import evaluate
from ..config import RESUME_OVERRIDABLE, Config, ConfigError, build_config, client_loss_of, from_sources, parse_sets, stability_warnings
from ..errors import RunFailed, oversize_reason
from .experiment import Experiment
from .files import RunLock, clean_stale_tmp, remove_entry, write_atomic
from ..methods import Aggregation, Failure, Reply
from ..methods.base import record_sent
from ..fl.robust import Rejected, nonfinite_fields, screen_reply
from .metrics import append_jsonl, downhill_report, falling_streak, read_jsonl, summarize, truncate_metrics, write_json
from ..fl.aggregation import ServerState
from .state import STATE_FILE, StateError, check_loaded_state, load_state, save_state, server_arrays
from .tracking import TRACKING_DIRS, TRACKING_FILE, Tracking, require as require_tracking
from .transport import Exchange, Transport

log = logging.getLogger("deltamask")

#: files a run writes; a fresh run refuses a folder holding any of them unless asked to overwrite (the trackers'
#: folders in the run folder too: an overwritten run's events must not mix with the new run's)
RUN_FILES = ("metrics.jsonl", STATE_FILE, "summary.json", "model.safetensors", "config.json", "accuracy.png", "bpp.png",
             TRACKING_FILE, *TRACKING_DIRS)


# --- selection, evaluation, records --------------------------------------------------------------
def select_clients(cfg: Config, round_: int, available: list[int] | None = None) -> list[int]:
    """K clients for this round, drawn from (seed, round) only: identical in every engine."""
    pool = list(range(cfg.num_clients)) if available is None else sorted(available)
    k = min(cfg.clients_per_round, len(pool))
    r = seeding.rng(cfg.seed, round_, -1, "select")
    return sorted(int(pool[i]) for i in r.choice(len(pool), size=k, replace=False))


def set_head(exp: Experiment, state: ServerState) -> None:
    with torch.no_grad():
        exp.net.head.weight.copy_(torch.from_numpy(state.head_weight))
        exp.net.head.bias.copy_(torch.from_numpy(state.head_bias))


def evaluate_global(exp: Experiment, state: ServerState, round_: int) -> dict[str, Any]:
    """Accuracy of the global model: deterministic mask [theta >= 0.5], and one sampled mask."""
    set_head(exp, state)
    exp.method.prepare_eval(state)
    mask = exp.method.eval_mask(state)
    acc, loss = evaluate(exp.net, exp.test_h, exp.test_y, mask)
    out: dict[str, Any] = {"accuracy": acc, "loss": loss}
    if exp.cfg.eval_sampled and exp.method.uses_masks():
        g = seeding.generator(exp.cfg.seed, round_, -1, "eval-sample")
        sampled = torch.rand(state.theta.shape, generator=g) < torch.from_numpy(state.theta)
        out["sampled_accuracy"], out["sampled_loss"] = evaluate(exp.net, exp.test_h, exp.test_y, sampled)
        out["mask_density"] = float((state.theta >= 0.5).mean())
    return out


def round_record(
    exp: Experiment,
    round_: int,
    selected: list[int],
    downlink_bits: dict[int, int],
    replies: list[Reply],
    failures: list[Failure],
    agg: Aggregation,
    evaluation: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """The round's line in ``metrics.jsonl``: generic fields here, the method's own from
    :meth:`Method.record_fields`."""
    n = exp.net.num_masked
    n_all = exp.net.num_backbone_params
    up = sum(8 * len(r.payload) for r in replies)
    down = sum(downlink_bits.values())
    n_up = max(len(replies), 1)
    n_down = max(len(downlink_bits), 1)
    bound = [c["bound_bits"] for c in agg.clients if "bound_bits" in c]
    kl = [c["kl_floor_bits"] for c in agg.clients if "kl_floor_bits" in c]
    dropped = {d.client for d in agg.dropped}
    accepted = [r for r in replies if r.client_id not in dropped]  # a malformed reply's metrics do not count
    rec: dict[str, Any] = {
        "round": round_,
        "phase": agg.phase,
        "selected": selected,
        "num_replies": len(replies),
        "num_aggregated": agg.num_good,
        "skipped_update": agg.skipped,
        "failures": [f.record() for f in [*failures, *agg.dropped]],
        "uplink_bits": up,
        "downlink_bits": down,
        "uplink_bpp": up / n_up / n,
        "downlink_bpp": down / n_down / n,
        "uplink_bpp_all": up / n_up / n_all,
        "downlink_bpp_all": down / n_down / n_all,
        "uplink_bound_bpp": (sum(bound) / len(bound) / n) if bound else None,
        "uplink_kl_floor_bpp": (sum(kl) / len(kl) / n) if kl else None,
        "train_loss": float(np.mean([r.metrics.get("train_loss", np.nan) for r in accepted])) if accepted else None,
        "seconds": seconds,
    }
    if agg.clients:
        rec["clients"] = agg.clients
    rec.update(exp.method.record_fields(agg, accepted))
    if evaluation:
        rec.update(evaluation)
    return rec


# --- what the server believes of a reply ---------------------------------------------------------
def screen_replies(exp: Experiment, replies: list[Reply]) -> tuple[list[Reply], list[Failure]]:
    """Each reply's envelope checked against what the server knows (:func:`robust.screen_reply`): the
    sample count is the server's own (a different claim is rejected), metrics are finite numbers. The
    accepted replies carry the server's sample count; the others become ``rejected`` failures."""
    good: list[Reply] = []
    bad: list[Failure] = []
    sizes = exp.client_sizes
    cap = exp.method.max_reply_bytes()
    for r in replies:
        try:
            if not 0 <= r.client_id < len(sizes):
                raise Rejected(f"client id {r.client_id} is outside [0, {len(sizes)})")
            if sizes[r.client_id] <= 0:
                raise Rejected(f"client {r.client_id}'s partition is empty: it cannot have trained")
            too_large = oversize_reason(len(r.payload), cap)
            if too_large:
                raise Rejected(too_large)
            screen_reply(r.client_id, r.num_samples, r.metrics, sizes[r.client_id])
        except Exception as e:  # noqa: BLE001 - anything a reply carries that does not check out rejects it
            why = str(e) if isinstance(e, Rejected) else f"{type(e).__name__}: {e}"
            bad.append(Failure(r.client_id, f"rejected reply: {why}"[:500], "rejected"))
            continue
        good.append(Reply(r.client_id, r.payload, int(sizes[r.client_id]), dict(r.metrics)))
    return good, bad


def check_state_finite(state: ServerState, rnd: int) -> None:
    """A NaN or infinity in the server state ends the run loudly (it would be broadcast and written as the
    model): :class:`RunFailed` names the arrays."""
    bad = nonfinite_fields(server_arrays(state))
    if bad:
        raise RunFailed(f"round {rnd} left non-finite values in the server state ({', '.join(bad[:5])}); the model is not "
                        "written: check the clients' replies in metrics.jsonl and the robust options (clip_factor, robust_mean)")


# --- the output folder -----------------------------------------------------------------------------
def write_config(out: Path, cfg: Config) -> None:
    write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def prepare_out(out: Path, overwrite: bool) -> None:
    """A fresh run's folder: refuse one that holds a run unless ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    present = [f for f in RUN_FILES if os.path.lexists(out / f)]
    if present and not overwrite:
        raise ConfigError(
            f"output folder {str(out)!r} already holds a run ({', '.join(present)}); choose another folder, "
            "continue it with --resume (Flower: resume=true), or replace it with --overwrite (Flower: overwrite=true)"
        )
    for f in present:
        remove_entry(out / f)  # the name only: a symlink is unlinked, never what it points at


def resume_config(out: Path, overrides: dict[str, Any]) -> Config:
    """The saved config of a run, with only the keys that do not change the result overridable."""
    _, _, saved, _ = load_state(out)
    bad = [k for k in overrides if k.replace("-", "_") not in RESUME_OVERRIDABLE]
    if bad:
        raise ConfigError(f"cannot change {', '.join(bad)} when resuming; only {', '.join(sorted(RESUME_OVERRIDABLE))} may change")
    cfg = build_config(saved)
    return build_config(overrides, base=cfg, from_strings=True)


def run_target(
    config_path: str | None, sets: list[str] | None, out: str | None, resume_dir: str | None, overwrite: bool, default_out: str
) -> tuple[Config, Path, bool, dict[str, Any]]:
    """What a run command (``deltamask run``, ``deltamask flower simulate``) runs: (config, output folder,
    whether to replace a run there, the preset's engine keys). ``--resume DIR`` takes the saved config;
    a preset's ``out-dir`` and ``overwrite`` count unless the command line says otherwise."""
    if resume_dir:
        if config_path:
            raise ConfigError("--resume uses the run's saved config; do not pass --config")
        return resume_config(Path(resume_dir), parse_sets(sets or [])), Path(resume_dir), False, {}
    cfg, engine = from_sources(config_path, sets, with_engine=True)
    if engine.get("resume"):
        raise ConfigError("resume = true (in the preset or --set) is a Flower run-config key; continue a run with --resume DIR instead")
    return cfg, Path(out or engine.get("out_dir") or default_out), bool(overwrite or engine.get("overwrite")), engine


def check_resumable(cfg: Config, saved: dict[str, Any], out: Path) -> None:
    """A resumed run must compute what the interrupted one did: only RESUME_OVERRIDABLE may differ."""
    now = cfg.to_dict()
    diff = sorted(k for k in set(now) | set(saved) if k not in RESUME_OVERRIDABLE and now.get(k) != saved.get(k))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:5])
        raise ConfigError(
            f"cannot resume the run in {str(out)!r} with another config: {shown}; resume with the run's own "
            f"config (only {', '.join(sorted(RESUME_OVERRIDABLE))} may change) or start a new run in another folder"
        )


def finish_run(out: Path, exp: Experiment, state: ServerState, started: float, engine: str, failure: str | None = None) -> dict[str, Any]:
    """For a run that did not fail the model artifact, then summary.json (from metrics.jsonl), then the plots.
    The artifact goes first so that a summary saying ``completed`` always has its model beside it (a kill in
    between leaves no summary, and ``--resume`` writes both)."""
    from .artifact import save_artifact
    from .report import plot_run

    refused = None
    if failure is None:
        bad = nonfinite_fields({"theta": state.theta, "head_weight": state.head_weight, "head_bias": state.head_bias,
                                "delta": exp.method.global_delta(state)})
        if bad:
            failure = refused = f"the final model holds non-finite values ({', '.join(bad)}); no model.safetensors was written"
            log.error("run failed: %s", failure)
    if failure is None:
        set_head(exp, state)
        save_artifact(out / "model.safetensors", exp, state)
    records = read_jsonl(out / "metrics.jsonl")
    meta = exp.describe()
    meta.pop("masked_params", None)
    meta["config"] = exp.cfg.to_dict()
    summary = summarize(records, meta)
    summary["engine"] = engine
    summary["status"] = "failed" if failure else "completed"
    summary["client_loss"] = client_loss_of(exp.cfg)  # what client_loss=auto resolved to in this build
    summary["clients_never_joined"] = never = never_joined(records, exp.cfg.num_clients)
    if never:
        log.warning("partitions %s never joined the run (no node served them in any of its %d rounds)", never, len(records))
    summary["downhill"] = downhill = downhill_report(records, exp.cfg.downhill_rounds, exp.cfg.downhill_drop)
    if downhill:
        log.warning("the run walked downhill: %s", describe_downhill(downhill))
    if failure:
        summary["failure"] = failure
    summary["setup_seconds"] = exp.setup_seconds
    summary["elapsed_seconds"] = time.time() - started
    write_json(out / "summary.json", summary)
    if records:
        plot_run(out)
    if refused:
        raise RunFailed(refused)
    return summary


def never_joined(records: list[dict[str, Any]], num_clients: int) -> list[int]:
    """Client ids that no round could select (``unavailable`` in every round's record: on Flower, a
    partition no SuperNode served); [] when every client was available at least once."""
    if not records:
        return []
    out = set(range(num_clients))
    for r in records:
        out &= set(r.get("unavailable", []))
    return sorted(out)


def describe_downhill(d: dict[str, Any]) -> str:
    """One line for a :func:`~deltamask.run.metrics.downhill_report`."""
    parts = [f"accuracy fell {f['from_accuracy']:.4f} -> {f['to_accuracy']:.4f} over rounds {f['from_round']}-{f['to_round']}"
             for f in d.get("falls", [])]
    if "below_best" in d:
        b = d["below_best"]
        parts.append(f"final {b['final_accuracy']:.4f} is {b['gap']:.4f} below the best {b['best_accuracy']:.4f} (round {b['best_round']})")
    return "; ".join(parts)


class Progress:
    """One status line per round on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool, total_rounds: int) -> None:
        self.enabled = enabled
        self.total = total_rounds
        self.tty = sys.stderr.isatty()
        self.round_times: list[float] = []

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[deltamask] {msg}", file=sys.stderr, flush=True)

    def round_done(self, rec: dict[str, Any]) -> None:
        self.round_times.append(rec["seconds"])
        if not self.enabled:
            return
        left = self.total - rec["round"]
        eta = left * float(np.median(self.round_times[-5:]))
        acc = rec.get("accuracy")
        acc_s = f"acc {acc:.4f}" if acc is not None else "acc -"
        fails = f" | {len(rec['failures'])} failed" if rec["failures"] else ""
        if rec.get("unavailable"):
            fails += f" | partitions {rec['unavailable']} not served"
        skipped = " | no update" if rec["skipped_update"] else ""
        fall = rec.get("falling")
        if fall:
            skipped += f" | FALLING {fall['rounds']} rounds ({fall['from_accuracy']:.4f} -> {fall['to_accuracy']:.4f})"
        line = (
            f"[round {rec['round']}/{self.total}] {rec['phase']:4s} | clients {rec['num_replies']}/{len(rec['selected'])} | "
            f"{acc_s} | up {rec['uplink_bpp']:.4f} bpp | down {rec['downlink_bpp']:.4f} bpp | "
            f"{rec['seconds']:.1f}s | ETA {int(eta // 60)}m{int(eta % 60):02d}s{fails}{skipped}"
        )
        print(("\r" if self.tty else "") + line, file=sys.stderr, flush=True)


# --- the driver ------------------------------------------------------------------------------------
def _resume(exp: Experiment, transport: Transport, out: Path) -> tuple[ServerState, list[dict[str, Any]]]:
    """Load the state, hand the persisted client caches back to the transport, and make the server
    forget what it believed the other clients held (they get it re-sent: same result)."""
    state, client_states, saved, engine = load_state(out)
    check_resumable(exp.cfg, saved, out)
    check_loaded_state(state, client_states, exp.method.init_state(), exp.cfg.num_clients, out)
    transport.bind(dict(state.identities))
    held = transport.restore(client_states)
    believed = set(state.client_theta_version) | set(state.client_head_version)
    lost = sorted(believed - held)
    if lost and exp.method.client_memory:
        raise StateError(
            f"cannot resume {exp.cfg.method} in {str(out)!r} on the {transport.name} engine: its clients keep memory the "
            f"server cannot re-send (error feedback), and the caches of clients {lost} are not held here (the state was "
            f"written by the {engine} engine); start a new run"
        )
    for cid in lost:
        exp.method.delivered(state, cid, False)
    exp.method.resumed(state)  # before any send, after the server forgot what it cannot re-send
    if lost:
        log.info("resume: clients %s get theta/head re-sent (their caches are not held by the %s engine)", lost, transport.name)
    metrics = out / "metrics.jsonl"
    try:
        truncate_metrics(metrics, state.round)  # drops lines of a round whose state was never saved
        records = read_jsonl(metrics)
    except ValueError as e:
        raise StateError(f"cannot resume in {str(out)!r}: {e}; the summary is computed from it, so restore the file or start again") from None
    rounds = [r.get("round") for r in records]
    if rounds != list(range(1, state.round + 1)):
        raise StateError(
            f"cannot resume in {str(out)!r}: the state is at round {state.round} but {str(metrics)!r} holds rounds {rounds}; "
            "the summary is computed from it, so restore the file or start again in a new folder"
        )
    return state, records


def _skip_status(records: list[dict[str, Any]]) -> tuple[int, bool]:
    """(consecutive rounds without an update at the end, whether any round updated)."""
    streak = 0
    for r in records:
        streak = streak + 1 if r.get("skipped_update") else 0
    return streak, any(not r.get("skipped_update") for r in records)


def run_rounds(
    exp: Experiment,
    transport: Transport,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``exp`` over ``transport``, writing the run to ``out_dir``; returns the summary.
    ``stop_after`` ends the run after that round without finishing it (to test resume). Raises
    :class:`RunFailed` (after writing ``summary.json``) when the run fails."""
    out = Path(out_dir)
    with RunLock(out):  # one run writes a folder at a time
        clean_stale_tmp(out, RUN_FILES)  # what a killed run's writes left
        return _run_rounds(exp, transport, out, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress)


def attach_root(exp: Experiment) -> None:
    """Give the method the server's root set (``root_samples``), or take it away where the config has none
    (an experiment reused with another config); a config that asks for one the experiment lacks is refused
    before the run starts."""
    cfg = exp.cfg
    if not cfg.root_samples:
        exp.method.root = None  # type: ignore[attr-defined]
        return
    if exp.root is None or exp.root.num_samples != cfg.root_samples:
        have = 0 if exp.root is None else exp.root.num_samples
        raise ConfigError(f"config key 'root_samples': {cfg.root_samples} asked for, the server's experiment holds a root set "
                          f"of {have} images (build it with this config)")
    if not hasattr(exp.method, "root"):
        raise ConfigError(f"config key 'root_samples': method {cfg.method!r} combines no heads")
    exp.method.root = exp.root  # type: ignore[attr-defined]


def _run_rounds(exp: Experiment, transport: Transport, out: Path, *, resume: bool, overwrite: bool, stop_after: int | None,
                progress: Progress | None) -> dict[str, Any]:
    started = time.time()
    cfg, method = exp.cfg, exp.method
    progress = progress or Progress(cfg.progress, cfg.rounds)
    require_tracking(cfg)  # a tracker's missing library is refused before the folder is touched
    attach_root(exp)
    if resume:
        state, records = _resume(exp, transport, out)
        progress.say(f"resuming after round {state.round}")
    else:
        prepare_out(out, overwrite)
        state, records = method.init_state(), []
        write_atomic(out / "metrics.jsonl", "")
        write_config(out, cfg)
    streak, any_update = _skip_status(records)
    last = records[-1] if records else None
    progress.say(
        f"{cfg.method} on {cfg.model} / {cfg.dataset} ({transport.name}): N={exp.net.num_masked:,} masked of "
        f"{exp.net.num_backbone_params:,} backbone params, {cfg.num_clients} clients, {cfg.clients_per_round}/round -> {out}"
    )
    for warning in stability_warnings(cfg):
        log.warning("%s", warning)
    tracking = Tracking.open(cfg, out, records, resume, transport.name, progress.say)
    status = None  # the tracked run's end: None (stopped, interrupted: it stays RUNNING), FINISHED or FAILED
    try:
        summary = _drive(exp, transport, out, state, records, streak, any_update, last, started, stop_after, progress, tracking)
        status = "FINISHED" if summary.get("status") == "completed" else None
        return summary
    except Exception:
        status = "FAILED"
        raise
    finally:
        tracking.end(status)


def _drive(exp: Experiment, transport: Transport, out: Path, state: ServerState, records: list[dict[str, Any]], streak: int,
           any_update: bool, last: dict[str, Any] | None, started: float, stop_after: int | None, progress: Progress,
           tracking: Tracking) -> dict[str, Any]:
    """The rounds, then :func:`finish_run`; each round is tracked once its line and state are written."""
    cfg, method = exp.cfg, exp.method
    try:
        transport.max_reply_bytes = method.max_reply_bytes()
        transport.start()
        for rnd in range(state.round + 1, cfg.rounds + 1):
            rec = last = _one_round(exp, transport, state, rnd, out, records)
            records.append(rec)
            tracking.log_round(rec)
            progress.round_done(rec)
            streak = streak + 1 if rec["skipped_update"] else 0
            any_update = any_update or not rec["skipped_update"]
            if cfg.max_skipped_rounds and streak >= cfg.max_skipped_rounds:
                raise RunFailed(
                    f"{streak} consecutive rounds (up to round {rnd}) got no update: fewer than min_replies={cfg.min_replies} "
                    f"good replies ({_failure_summary(rec)}); fix the clients or raise max_skipped_rounds"
                )
            if stop_after is not None and rnd >= stop_after:
                return {"stopped_after": rnd}
        if not any_update:
            raise RunFailed(f"no round updated the model in {cfg.rounds} rounds (last: {_failure_summary(last)})")
    except RunFailed as e:
        log.error("run failed: %s", e)
        finish_run(out, exp, state, started, transport.name, failure=str(e))
        raise
    finally:
        transport.close()
    return finish_run(out, exp, state, started, transport.name)


def _failure_summary(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "no rounds ran"
    fails = rec.get("failures") or []
    if not fails:
        return f"round {rec['round']}: {rec['num_aggregated']} of {len(rec['selected'])} selected clients aggregated"
    shown = "; ".join(f"client {f['client']}: {f['reason']}" for f in fails[:3])
    return f"round {rec['round']}: {len(fails)} failed, e.g. {shown}"


def _send(method: Any, state: ServerState, client_id: int, rnd: int) -> bytes:
    """A client's downlink; the driver records what the client holds once it decodes it (the method's
    :meth:`~deltamask.methods.Method.send` changes no state)."""
    sent = method.send(state, client_id, rnd)
    record_sent(state, client_id, sent)
    return sent.payload


def _resend_stale(exp: Experiment, transport: Transport, state: ServerState, rnd: int, ex: Exchange, down_bits: dict[int, int]) -> list[int]:
    """Clients whose cached theta was not the version the server coded against (``StaleCache``: a node
    restarted, a late Flower ClientApp overwrote its state, a damaged cache) get a snapshot in the same
    round: the server forgets what it believed they held and sends again. Both sends are counted."""
    stale = sorted(c for c, f in ex.failures.items() if f.kind == "stale-cache")
    if not stale:
        return []
    for c in stale:
        log.warning("round %d: client %d holds a stale theta cache (%s); re-sending it a snapshot", rnd, c, ex.failures[c].reason)
        exp.method.delivered(state, c, False)
        transport.forget(c)
        del ex.failures[c]
    again = {c: _send(exp.method, state, c, rnd) for c in stale}
    ex2 = transport.exchange(rnd, again)
    for c, b in again.items():
        down_bits[c] += 8 * len(b)
    ex.replies.update(ex2.replies)
    ex.failures.update(ex2.failures)
    for k, v in ex2.fields.items():
        ex.fields[k] = ex.fields.get(k, 0) + v if isinstance(v, (int, float)) else v
    return stale


def _one_round(exp: Experiment, transport: Transport, state: ServerState, rnd: int, out: Path,
               history: list[dict[str, Any]]) -> dict[str, Any]:
    """One round; ``history``: the run's earlier round records (what ``metrics.jsonl`` holds), for the
    downhill report."""
    t0 = time.time()
    cfg, method = exp.cfg, exp.method
    available = transport.available(rnd)
    selected = select_clients(cfg, rnd, available)
    downlinks = {cid: _send(method, state, cid, rnd) for cid in selected}
    ex: Exchange = transport.exchange(rnd, downlinks)
    down_bits = {cid: 8 * len(b) for cid, b in downlinks.items()}
    resent = _resend_stale(exp, transport, state, rnd, ex, down_bits)
    replies = [ex.replies[c] for c in selected if c in ex.replies]
    failures = [ex.failures[c] for c in selected if c in ex.failures]
    failures += [Failure(c, "the transport returned neither a reply nor a failure", "transport") for c in selected
                 if c not in ex.replies and c not in ex.failures]
    for f in failures:
        log.warning("round %d: client %d dropped: %s", rnd, f.client, f.reason)
        method.delivered(state, f.client, False)
        transport.forget(f.client)
    screened, rejected = screen_replies(exp, replies)
    for r in screened:
        method.delivered(state, r.client_id, True)
    agg = method.aggregate(state, screened, rnd)
    agg.dropped[:0] = rejected
    for d in agg.dropped:
        log.warning("round %d: client %d dropped: %s", rnd, d.client, d.reason)
        method.delivered(state, d.client, False)
        transport.forget(d.client)
    state.round = rnd
    check_state_finite(state, rnd)
    state.identities = dict(transport.identities())
    evaluation = evaluate_global(exp, state, rnd) if (rnd % cfg.eval_every == 0 or rnd == cfg.rounds) else None
    rec = round_record(exp, rnd, selected, down_bits, replies, failures, agg, evaluation, time.time() - t0)
    rec.update(ex.fields)
    if available is not None and len(set(available)) < cfg.num_clients:  # partitions no node serves this round
        rec["unavailable"] = sorted(set(range(cfg.num_clients)) - set(available))
    if evaluation is not None:
        fall = falling_streak([*history, rec], cfg.downhill_rounds, cfg.downhill_drop)
        if fall:
            rec["falling"] = fall
            log.warning("round %d: global accuracy fell %s rounds in a row (%.4f -> %.4f, round %d on)", rnd, fall["rounds"],
                        fall["from_accuracy"], fall["to_accuracy"], fall["from_round"])
    if resent:
        rec["stale_resent"] = resent
    append_jsonl(out / "metrics.jsonl", rec)
    save_state(out, state, transport.client_states() or {}, cfg.to_dict(), engine=transport.name)
    return rec

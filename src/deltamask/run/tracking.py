"""Experiment tracking: a run's rounds, config and end artifacts in TensorBoard and/or MLflow.

``tracking = none | tensorboard | mlflow | tensorboard,mlflow`` (config key; ``pip install 'deltamask[tracking]'``).
The round driver (:func:`deltamask.run.round.run_rounds`, shared by ``deltamask run``, ``deltamask flower
simulate`` and a Flower deployment's ServerApp) calls :meth:`Tracking.log_round` after each round's line is in
``metrics.jsonl`` *and* its state is saved, and :meth:`Tracking.end` after ``finish_run``.

Where: ``tracking_dir`` empty = the run folder: TensorBoard events in ``OUT/tensorboard``, the MLflow store in
``OUT/mlruns`` (``mlflow.db``, a SQLite store, and ``artifacts/``). A ``tracking_dir`` shared by several runs
(``deltamask compare`` uses ``SUITE_OUT/tracking``) holds ``tensorboard/RUN_FOLDER_NAME`` per run side by side and
one MLflow store. MLflow runs are named after the run folder and logged in the experiment ``tracking_experiment``
(default ``deltamask``). MLflow's plain-folder store (``file:./mlruns``) refuses to open since MLflow 3.x without
``MLFLOW_ALLOW_FILE_STORE=true`` ("maintenance mode"), so the store is SQLite (``sqlite:///.../mlflow.db``),
which works offline with no server.

Per round (step = the round): ``accuracy``, ``loss``, ``sampled_accuracy``, ``train_loss``, ``uplink_bpp``,
``downlink_bpp``, ``total_bpp``, ``uplink_bytes``, ``downlink_bytes``, ``total_bytes``, ``seconds``,
``num_aggregated``, ``failures``, ``rejected``, ``clipped``, ``distrusted`` (heads given no trust against the server's
root set, ``root_samples``), ``skipped_update`` (:func:`round_metrics`). The
config: MLflow params; a TensorBoard text ``config``. At the end: ``accuracy.png`` / ``bpp.png``, ``summary.json``,
``config.json``, ``metrics.jsonl`` and ``model.safetensors`` as MLflow artifacts (status FINISHED, or FAILED for
a failed run); TensorBoard gets the plots as images and a text saying where the model lies.

Resume continues the same tracked run: ``OUT/tracking.json`` keeps the MLflow store, experiment and run id and the
TensorBoard log dir with the last round it logged. A resumed run reopens the MLflow run (status RUNNING again)
and logs the rounds its metric history lacks; TensorBoard reopens the same log dir with ``purge_step`` = the
first round not known to be logged, so that any event written past it is dropped by TensorBoard's readers.
Every round thus appears once. A run killed (or stopped by ``stop_after``) leaves the MLflow run RUNNING.

Failures: a missing library is a :class:`ConfigError` naming ``pip install 'deltamask[tracking]'`` before the
run touches its folder (:func:`require`). A tracker that fails during the run (a full disk, a locked database)
is logged as a warning once and switched off for the rest of that process; the run goes on, since
``metrics.jsonl`` is the record, and a later ``--resume`` fills in the rounds the tracker missed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, trackers_of
from .files import write_atomic

log = logging.getLogger("deltamask")

#: the run folder's record of its tracked runs (a file of ``RUN_FILES``)
TRACKING_FILE = "tracking.json"
#: the folders a run folder's own trackers write (``tracking_dir`` empty), removed with the run by ``overwrite``
TRACKING_DIRS = ("tensorboard", "mlruns")
INSTALL = "pip install 'deltamask[tracking]'"
#: modules each tracker needs (MLflow's SQLite store needs SQLAlchemy and Alembic, which mlflow-skinny lacks)
REQUIRES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
#: the files :meth:`Tracking.end` logs as artifacts, when the run folder has them
ARTIFACTS = ("accuracy.png", "bpp.png", "summary.json", "config.json", "metrics.jsonl", "model.safetensors")
DEFAULT_EXPERIMENT = "deltamask"
#: a metric every round record has: its MLflow history says which rounds a run logged
_EVERY_ROUND = "seconds"


def require(cfg: Config) -> tuple[str, ...]:
    """The trackers ``cfg.tracking`` asks for; a :class:`ConfigError` naming the install command when one's
    library cannot be imported (call it before the run writes anything)."""
    trackers = trackers_of(cfg.tracking)
    for t in trackers:
        missing = []
        for mod in REQUIRES[t]:
            try:
                importlib.import_module(mod)
            except ImportError:
                missing.append(mod)
        if missing:
            raise ConfigError(
                f"tracking={cfg.tracking!r} needs {', '.join(missing)}, which is not installed: {INSTALL} "
                "(or set tracking=none); nothing was run"
            )
    return trackers


def round_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """What a tracker logs of one ``metrics.jsonl`` record (absent and non-finite values left out)."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)

    for k in ("accuracy", "loss", "sampled_accuracy", "train_loss", "uplink_bpp", "downlink_bpp", "seconds",
              "num_aggregated", "mask_density"):
        put(k, rec.get(k))
    if "uplink_bpp" in out and "downlink_bpp" in out:
        out["total_bpp"] = out["uplink_bpp"] + out["downlink_bpp"]
    up, down = rec.get("uplink_bits"), rec.get("downlink_bits")
    put("uplink_bytes", None if up is None else up / 8)
    put("downlink_bytes", None if down is None else down / 8)
    if up is not None and down is not None:
        put("total_bytes", (up + down) / 8)
    failures = rec.get("failures") or []
    out["failures"] = float(len(failures))
    out["rejected"] = float(sum(1 for f in failures if f.get("kind") == "rejected"))
    clients = rec.get("clients") or []  # a mask round's jointly trained head: head_clipped, head_distrusted
    out["clipped"] = float(sum(1 for c in clients if c.get("clipped") is not None or c.get("head_clipped") is not None))
    out["distrusted"] = float(sum(1 for c in clients if c.get("distrusted") or c.get("head_distrusted")))
    out["skipped_update"] = float(bool(rec.get("skipped_update")))
    return out


def read_tracking(out: str | Path) -> dict[str, Any]:
    """``OUT/tracking.json`` ({} when the run was never tracked)."""
    p = Path(out) / TRACKING_FILE
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        log.warning("tracking: cannot read %s (%s); the trackers start new runs", p, e)
        return {}
    return data if isinstance(data, dict) else {}


def locations(cfg: Config, out: Path) -> dict[str, Path]:
    """Where each tracker writes for the run in ``out`` (absolute)."""
    out = out.resolve()
    if not cfg.tracking_dir:
        return {"tensorboard": out / "tensorboard", "mlflow": out / "mlruns"}
    root = Path(cfg.tracking_dir).expanduser().resolve()
    return {"tensorboard": root / "tensorboard" / out.name, "mlflow": root / "mlruns"}


def mlflow_uri(store: Path) -> str:
    """The MLflow tracking URI of a store folder (SQLite: ``mlflow ui --backend-store-uri`` takes it)."""
    return f"sqlite:///{store.resolve() / 'mlflow.db'}"


def _rel(p: Path, out: Path) -> str:
    """``p`` relative to the run folder when it lies in it (a moved run folder keeps its own trackers)."""
    try:
        return str(p.relative_to(out.resolve()))
    except ValueError:
        return str(p)


def _config_markdown(cfg: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | `{v!r}` |" for k, v in sorted(cfg.items()))


# --- the trackers ------------------------------------------------------------------------------------
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, logdir: Path, logged: int, view: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.view = view  # what `tensorboard --logdir` is given: this run's folder, or the shared root of several
        self.logged = logged
        # a reopened log dir drops (in TensorBoard's readers) every event at or past the first round not known to
        # be logged: a round written before a kill but not recorded in tracking.json appears once, not twice
        self.writer = SummaryWriter(str(logdir), purge_step=logged + 1 if logged else 0)

    def start(self, cfg: dict[str, Any], resumed_from: int | None) -> None:
        if not self.logged:
            self.writer.add_text("config", _config_markdown(cfg), 0)
        if resumed_from is not None:
            self.writer.add_text("resumed", f"resumed after round {resumed_from}", resumed_from + 1)

    def log_round(self, rnd: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, rnd)
        self.writer.flush()
        self.logged = rnd

    def end(self, out: Path, status: str | None, step: int) -> None:
        if status is not None:
            import numpy as np
            from PIL import Image

            for name in ("accuracy.png", "bpp.png"):
                if (out / name).is_file():
                    with Image.open(out / name) as im:
                        self.writer.add_image(name.removesuffix(".png"), np.asarray(im.convert("RGB")), step, dataformats="HWC")
            model = out / "model.safetensors"
            where = f"model: `{model.resolve()}`" if model.is_file() else "no model.safetensors (the run failed)"
            self.writer.add_text("run", f"status: {status.lower()}; run folder `{out.resolve()}`; {where}", step)
        self.writer.close()

    def record(self, out: Path) -> dict[str, Any]:
        return {"logdir": _rel(self.logdir, out), "logged_round": self.logged}


class _MLflow:
    name = "mlflow"

    def __init__(self, store: Path, experiment: str, run_name: str, saved: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        store.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.uri = mlflow_uri(store)
        self.client = MlflowClient(self.uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self.reopened = False
        run_id = saved.get("run_id")
        if run_id:
            try:
                run = self.client.get_run(run_id)
                self.run_id, self.experiment_id = run_id, run.info.experiment_id
                self.experiment = self.client.get_experiment(self.experiment_id).name  # a resumed run stays where it was
                self.reopened = True
            except Exception as e:  # noqa: BLE001 - a store that lost the run: start a new one (backfilled)
                log.warning("tracking: MLflow run %s is not in %s (%s); starting a new run with every round", run_id, self.uri, e)
        if self.run_id is None:
            self.experiment_id = self._experiment_id(experiment)
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        history = self.client.get_metric_history(self.run_id, _EVERY_ROUND) if self.reopened else []
        self.logged = max((m.step for m in history), default=0)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=(self.store / "artifacts").resolve().as_uri())
        except Exception:  # another run created it in between
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, cfg: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in sorted(cfg.items()) if k not in have]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        changed = {k: v for k, v in cfg.items() if k in have and have[k] != str(v)}
        if changed:  # params cannot change: a resume that overrides a key says so in a tag
            tags = {**tags, "deltamask.resume_overrides": json.dumps(changed, sort_keys=True, default=str)}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_round(self, rnd: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, rnd) for k, v in metrics.items()])
        self.logged = rnd

    def end(self, out: Path, status: str | None, step: int) -> None:
        if status is None:
            return  # stopped or killed: the run stays RUNNING, and --resume reopens it
        for name in ARTIFACTS:
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))
        self.client.set_terminated(self.run_id, status)

    def record(self, out: Path) -> dict[str, Any]:
        return {"store": _rel(self.store, out), "tracking_uri": self.uri, "experiment": self.experiment,
                "experiment_id": self.experiment_id, "run_id": self.run_id}


class Tracking:
    """The trackers of one run (possibly none). Every call survives a tracker's failure: a warning, and that
    tracker is off for the rest of this process."""

    def __init__(self, out: Path, trackers: list[Any], saved: dict[str, Any]) -> None:
        self.out = out
        self.trackers = trackers
        self.record = {k: v for k, v in saved.items() if k in ("tensorboard", "mlflow")}

    @classmethod
    def open(cls, cfg: Config, out: str | Path, records: list[dict[str, Any]], resumed: bool, engine: str = "",
             say: Callable[[str], None] | None = None) -> Tracking:
        """Open (or, ``resumed``, reopen) the trackers ``cfg`` asks for and log the rounds of ``records``
        (``metrics.jsonl``) that a tracker lacks. Call after :func:`require`."""
        out = Path(out)
        names = trackers_of(cfg.tracking)
        saved = read_tracking(out) if resumed else {}
        if not names:
            return cls(out, [], saved)
        where = locations(cfg, out)
        cfg_dict = cfg.to_dict()
        last = records[-1]["round"] if records else 0
        opened: list[Any] = []
        for name in names:
            prev = saved.get(name) if isinstance(saved.get(name), dict) else {}
            try:
                if name == "tensorboard":
                    same = prev.get("logdir") is not None and _resolve(prev["logdir"], out) == where["tensorboard"]
                    logged = int(prev.get("logged_round", 0)) if same else 0
                    view = where["tensorboard"].parent if cfg.tracking_dir else where["tensorboard"]
                    t: Any = _TensorBoard(where["tensorboard"], min(logged, last), view)
                    t.start(cfg_dict, last if resumed else None)
                else:
                    same = prev.get("store") is not None and _resolve(prev["store"], out) == where["mlflow"]
                    t = _MLflow(where["mlflow"], cfg.tracking_experiment or DEFAULT_EXPERIMENT, out.name, prev if same else {})
                    t.start(cfg_dict, {"deltamask.run_dir": str(out.resolve()), "deltamask.engine": engine,
                                       "deltamask.method": cfg.method})
            except Exception as e:  # noqa: BLE001 - tracking never stops the run: metrics.jsonl is the record
                log.warning("tracking: cannot open %s (%s: %s); the run goes on without it (metrics.jsonl holds every "
                            "round; --resume tries again and fills it in)", name, type(e).__name__, e)
                continue
            opened.append(t)
        tracking = cls(out, opened, saved)
        for t in tuple(opened):  # a copy: a tracker that fails leaves tracking.trackers (this very list)
            missed = [r for r in records if r.get("round", 0) > t.logged]
            for rec in missed:
                if not tracking._call(t, "log round", lambda t=t, rec=rec: t.log_round(rec["round"], round_metrics(rec))):
                    break
        tracking._save()
        if say:
            for line in tracking.describe():
                say(line)
        return tracking

    def describe(self) -> list[str]:
        """A line per open tracker: where it writes and how to look at it."""
        lines = []
        for t in self.trackers:
            if t.name == "tensorboard":
                lines.append(f"tracking: tensorboard -> {t.logdir} (tensorboard --logdir {t.view})")
            else:
                lines.append(f"tracking: mlflow run {t.run_id} in experiment {t.experiment!r} (mlflow ui --backend-store-uri {t.uri})")
        return lines

    def _call(self, t: Any, what: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - see the module docstring: warn, switch the tracker off, go on
            log.warning("tracking: %s failed to %s (%s: %s); it is off for the rest of this run, which goes on "
                        "(metrics.jsonl holds every round; --resume fills the tracker in)", t.name, what, type(e).__name__, e)
            if t in self.trackers:
                self.trackers.remove(t)
            try:
                if t.name == "tensorboard":
                    t.writer.close()
            except Exception as close_error:  # noqa: BLE001 - it failed already; closing is best effort
                log.debug("tracking: closing %s after its failure: %s", t.name, close_error)
            return False

    def _save(self) -> None:
        if not self.trackers and not self.record:
            return
        for t in self.trackers:
            self.record[t.name] = t.record(self.out)
        try:
            write_atomic(self.out / TRACKING_FILE, json.dumps(self.record, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            log.warning("tracking: cannot write %s (%s)", self.out / TRACKING_FILE, e)

    def log_round(self, rec: dict[str, Any]) -> None:
        """Log a round whose line is in metrics.jsonl and whose state is saved."""
        if not self.trackers:
            return
        metrics = round_metrics(rec)
        for t in list(self.trackers):
            self._call(t, f"log round {rec['round']}", lambda t=t: t.log_round(rec["round"], metrics))
        self._save()

    def end(self, status: str | None) -> None:
        """``FINISHED`` / ``FAILED``: log the end artifacts and close the tracked runs; None (stopped, killed):
        close the writers, the MLflow run stays RUNNING for ``--resume``."""
        step = max((t.logged for t in self.trackers), default=0)
        for t in list(self.trackers):
            self._call(t, "end the run", lambda t=t: t.end(self.out, status, step))
        self.trackers = []


def _resolve(saved: str, out: Path) -> Path:
    p = Path(saved)
    return p if p.is_absolute() else (out.resolve() / p)


def log_export(run_dir: str | Path, export_dir: str | Path, artifact_path: str = "export") -> dict[str, str]:
    """Log an exported model folder to the tracked runs of the run in ``run_dir`` (from its ``tracking.json``):
    MLflow: the folder's files as artifacts under ``artifact_path``; TensorBoard: a text ``export`` naming the
    folder and its files. Returns {tracker: where it went}; {} for a run that was not tracked. A missing library
    raises :class:`ConfigError`; a tracker that fails is a warning (the export itself stands)."""
    run_dir, export_dir = Path(run_dir), Path(export_dir)
    if not export_dir.is_dir():
        raise ConfigError(f"export folder {str(export_dir)!r} does not exist")
    saved = read_tracking(run_dir)
    done: dict[str, str] = {}
    for name in ("tensorboard", "mlflow"):
        rec = saved.get(name)
        if not isinstance(rec, dict):
            continue
        missing = [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"the run in {str(run_dir)!r} is tracked with {name}, which needs {', '.join(missing)}: {INSTALL}")
        try:
            if name == "mlflow":
                from mlflow.tracking import MlflowClient

                client = MlflowClient(rec["tracking_uri"])
                client.log_artifacts(rec["run_id"], str(export_dir), artifact_path)
                done[name] = f"{rec['tracking_uri']} run {rec['run_id']}, artifacts {artifact_path}/"
            else:
                from torch.utils.tensorboard import SummaryWriter

                logdir = _resolve(rec["logdir"], run_dir)
                files = sorted(p.name for p in export_dir.iterdir())
                with SummaryWriter(str(logdir)) as w:
                    w.add_text("export", f"exported model: `{export_dir.resolve()}` ({', '.join(files)})", int(rec.get("logged_round", 0)))
                done[name] = str(logdir)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: could not log the export %s to %s (%s: %s)", export_dir, name, type(e).__name__, e)
    return done

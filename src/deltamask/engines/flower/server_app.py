"""The deltamask ServerApp: build the server side of the experiment and drive the round over Flower.

The server prepares the model and the test set only (``build_experiment(cfg, clients=[])``); clients
prepare their own partitions. The round is :func:`deltamask.run.round.run_rounds`, the same as the local
engine's, over a :class:`~deltamask.engines.flower.transport.FlowerTransport`. Outputs land in
``out-dir`` (absolute, below the server-side output root ``$DELTAMASK_OUT_ROOT``, default ``~/deltamask-runs``;
default ``ROOT/flower-RUN_ID``): ``config.json``, ``metrics.jsonl``,
``state.safetensors`` after every round, and at the end ``summary.json``, the plots and
``model.safetensors``: the same files ``deltamask run`` writes. ``resume = true`` continues the run in
``out-dir``; an existing run there is otherwise refused unless ``overwrite = true``.

A run that fails (no node joined, too many rounds without an update, a config error) raises, so the
ServerApp exits non-zero and ``flwr ls`` shows ``finished:failed``; ``summary.json`` says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...config import ConfigError
from ...run.experiment import build_experiment
from ...run.round import Progress, run_rounds
from ...run.tracking import require as require_tracking
from .settings import check_below_root, out_dir_of, resolve
from .settings import out_root as default_root
from .transport import FlowerTransport

log = logging.getLogger("deltamask")


def run_server(grid: Grid, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, run_id: int | None = None,
               out_root: str | Path | None = None) -> dict[str, Any]:
    """Run a whole deltamask experiment over ``grid``; returns the summary. ``out-dir`` must lie below
    ``out_root`` (default: ``$DELTAMASK_OUT_ROOT``, else ``~/deltamask-runs``; see :func:`out_dir_of`)."""
    cfg, settings = resolve(run_config, defaults)
    root = Path(out_root) if out_root is not None else default_root()
    out = out_dir_of(settings, run_id, root)
    if cfg.cache_dir:  # the disk prefix cache is written on the server too: below the root like the run folder
        check_below_root("cache-dir", cfg.cache_dir, root)
    if cfg.tracking_dir:  # the trackers write there (and a fresh TensorBoard run hides what its log dir held)
        if not Path(cfg.tracking_dir).expanduser().is_absolute():
            raise ConfigError(f"run_config key 'tracking-dir' = {cfg.tracking_dir!r} is relative, so it would land wherever the "
                              f"SuperLink was started; give an absolute folder below the output root {root}")
        check_below_root("tracking-dir", cfg.tracking_dir, root)
    require_tracking(cfg)  # a missing tracker library fails the run before the model and data are built
    progress = Progress(cfg.progress, cfg.rounds)
    exp = build_experiment(cfg, progress.say, clients=[])  # the test set only; describe() still knows the split
    transport = FlowerTransport(grid, exp.cfg, settings)
    return run_rounds(exp, transport, out, resume=settings.resume, overwrite=settings.overwrite, progress=progress)


def make_server_app(defaults: Mapping[str, Any] | None = None, out_root: str | Path | None = None) -> ServerApp:
    """A ServerApp. ``defaults`` are config keys under the run's ``run_config`` (used where Flower
    passes none, e.g. ``run_simulation``); ``out_root``: the folder runs may write below (default
    ``$DELTAMASK_OUT_ROOT``, else ``~/deltamask-runs``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context.run_config, defaults, run_id=context.run_id, out_root=out_root)

    return app


#: the app ``flwr run`` loads (``serverapp = "deltamask.engines.flower.server_app:app"``)
app = make_server_app()

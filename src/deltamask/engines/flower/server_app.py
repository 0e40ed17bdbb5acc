"""The deltamask ServerApp: build the server side of the experiment, run the strategy, write the run.

The server prepares the model and the test set only (``build_experiment(cfg, clients=[])``); clients
prepare their own partitions. Outputs land in ``out-dir`` (a run_config key; relative paths are relative
to the ServerApp process's working directory): ``config.json``, ``metrics.jsonl`` (one line per round,
written as the round ends), ``state.safetensors``, and at the end ``summary.json``, the plots and
``model.safetensors`` -- the same files ``deltamask run`` writes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...experiment import build_experiment
from ...metrics import write_json
from ..common import Progress, finish_run, write_config
from .settings import resolve
from .strategy import DeltaMaskStrategy

log = logging.getLogger("deltamask")


def run_server(grid: Grid, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run a whole deltamask experiment over ``grid``; returns the summary."""
    started = time.time()
    cfg, settings = resolve(run_config, defaults)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    write_config(out, cfg)
    progress = Progress(cfg.progress, cfg.rounds)
    exp = build_experiment(cfg, progress.say, clients=[])  # the test set only; describe() still knows the split
    progress.say(
        f"{cfg.method} on {cfg.model} / {cfg.dataset} over Flower: N={exp.net.num_masked:,} masked of "
        f"{exp.net.num_backbone_params:,} backbone params, {cfg.num_clients} clients, {cfg.clients_per_round}/round -> {out}"
    )
    strategy = DeltaMaskStrategy(exp, out, settings, progress)
    strategy.start(
        grid,
        strategy.global_arrays(),
        num_rounds=cfg.rounds,
        timeout=settings.round_timeout,
        evaluate_fn=strategy.evaluate_fn,
    )
    summary = finish_run(out, exp, strategy.state, started)
    summary["engine"] = "flower"
    write_json(out / "summary.json", summary)
    return summary


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp. ``defaults`` are config keys under the run's ``run_config`` (used where Flower
    passes none, e.g. ``run_simulation``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context.run_config, defaults)

    return app


#: the app ``flwr run`` loads (``serverapp = "deltamask.engines.flower.server_app:app"``)
app = make_server_app()

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

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ... import data as data_mod
from ...experiment import Experiment, build_experiment
from ...metrics import write_json
from ..common import Progress, finish_run, write_config
from .settings import resolve
from .strategy import DeltaMaskStrategy

log = logging.getLogger("deltamask")


def _federation_view(exp: Experiment) -> None:
    """Give the server's experiment the true partition sizes (for ``summary.json``).

    ``build_experiment(clients=[])`` keeps no training data, so its partitions are empty; the split
    itself is a pure function of the labels and the config, so the server recomputes it. Only sizes
    and labels are kept: the server never calls ``client_data``.
    """
    cfg = exp.cfg
    exp.partitions = data_mod.partition(exp.dataset.y_train, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed, cfg.min_partition_size)
    exp.train_y = torch.from_numpy(np.asarray(exp.dataset.y_train, dtype=np.int64))


def run_server(grid: Grid, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run a whole deltamask experiment over ``grid``; returns the summary."""
    started = time.time()
    cfg, settings = resolve(run_config, defaults)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    write_config(out, cfg)
    progress = Progress(cfg.progress, cfg.rounds)
    exp = build_experiment(cfg, progress.say, clients=[])
    _federation_view(exp)
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

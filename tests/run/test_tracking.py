"""Experiment tracking (issue 24): what a tracked run writes, read back with each tracker's own reader API
(TensorBoard's EventAccumulator, MLflow's MlflowClient), through every engine's driver, compare, resume,
a failed run, a tracker failing mid-run and a missing library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from dmtest import TINY, tiny_config  # noqa: E402
from deltamask.config import ConfigError, build_config, trackers_of  # noqa: E402
from deltamask.engines.local import run_local  # noqa: E402
from deltamask.run import tracking as tracking_mod  # noqa: E402
from deltamask.run.metrics import read_jsonl  # noqa: E402
from deltamask.run.tracking import log_export, read_tracking, round_metrics  # noqa: E402


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log dir as TensorBoard reads it: [(step, value)] in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def tb_tags(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    return ea.Tags()


def mlflow_run(out: Path):  # noqa: ANN201
    """(client, run) of the MLflow run a run folder's tracking.json names."""
    from mlflow.tracking import MlflowClient

    rec = read_tracking(out)["mlflow"]
    client = MlflowClient(rec["tracking_uri"])
    return client, client.get_run(rec["run_id"])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:  # noqa: ANN001
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected(out: Path, key: str) -> list[tuple[int, float]]:
    """``key`` per round as metrics.jsonl gives it (the tracker's metric of the record)."""
    return [(r["round"], round_metrics(r)[key]) for r in read_jsonl(out / "metrics.jsonl") if key in round_metrics(r)]


def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Same steps, same values to float32 (TensorBoard stores scalars as float32)."""
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for (_, x), (_, y) in zip(a, b))


KEYS = ("accuracy", "loss", "uplink_bpp", "downlink_bpp", "total_bpp", "uplink_bytes", "downlink_bytes", "total_bytes",
        "seconds", "failures", "rejected", "clipped")


def test_the_tracking_key() -> None:
    assert trackers_of("none") == trackers_of("") == ()
    assert trackers_of("mlflow, TensorBoard") == ("tensorboard", "mlflow")
    assert build_config({"tracking": "tensorboard,mlflow"}).tracking == "tensorboard,mlflow"
    for bad in ("wandb", "none,mlflow", "mlflow,mlflow", "tensorboard;mlflow"):
        with pytest.raises(ConfigError, match="config key 'tracking'.*tensorboard,mlflow"):
            build_config({"tracking": bad})
    from deltamask.config import RESUME_OVERRIDABLE

    assert {"tracking", "tracking_dir", "tracking_experiment"} <= RESUME_OVERRIDABLE


def test_round_metrics_of_a_record() -> None:
    rec = {"round": 4, "accuracy": 0.5, "loss": 1.25, "train_loss": float("nan"), "uplink_bpp": 0.25, "downlink_bpp": 1.0,
           "uplink_bits": 800, "downlink_bits": 1600, "seconds": 2.0, "num_aggregated": 2, "skipped_update": False,
           "failures": [{"client": 1, "kind": "rejected"}, {"client": 2, "kind": "timeout"}, {"client": 3, "kind": "rejected"}],
           "clients": [{"client": 0, "clipped": 0.5}, {"client": 4}, {"client": 5, "head_clipped": 0.2, "head_distrusted": "why"},
                       {"client": 6, "distrusted": "why", "trust": 0.0}], "sampled_accuracy": None}
    assert round_metrics(rec) == {
        "accuracy": 0.5, "loss": 1.25, "uplink_bpp": 0.25, "downlink_bpp": 1.0, "total_bpp": 1.25, "seconds": 2.0,
        "num_aggregated": 2.0, "uplink_bytes": 100.0, "downlink_bytes": 200.0, "total_bytes": 300.0, "failures": 3.0,
        "rejected": 2.0, "clipped": 2.0, "distrusted": 2.0, "skipped_update": 0.0,
    }  # absent, None and non-finite values are left out


@pytest.mark.parametrize("module", ["mlflow", "tensorboard", "sqlalchemy"])
def test_a_missing_library_is_refused_before_anything_runs(tmp_path, monkeypatch, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    tracker = "tensorboard" if module == "tensorboard" else "mlflow"
    with pytest.raises(ConfigError, match=rf"needs {module}.*pip install 'deltamask\[tracking\]'"):
        run_local(tiny_config(tracking=tracker), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing built, nothing written
    if module == "mlflow":
        run_local(tiny_config(rounds=1, head_warmup_rounds=1), tmp_path / "plain")  # tracking=none never imports it


def test_tracked_run_resumed_after_a_tracker_failure_logs_every_round_once(tmp_path, monkeypatch, caplog) -> None:
    """Both trackers; MLflow fails to log round 2 (a full disk, say): a warning, the run goes on without it.
    The run stops after round 3 (as if killed: the MLflow run stays RUNNING), and a killed successor had written
    TensorBoard events for round 4 before its state was saved. ``--resume`` continues the same MLflow run, fills
    in rounds 2-3, drops the stray round-4 events: each tracker ends with every round exactly once."""
    out = tmp_path / "run"
    cfg = tiny_config(rounds=4, tracking="tensorboard,mlflow")
    real = tracking_mod._MLflow.log_round

    def full_disk(self, rnd, metrics):  # noqa: ANN001, ANN202
        if rnd == 2:
            raise OSError(28, "No space left on device")
        return real(self, rnd, metrics)

    monkeypatch.setattr(tracking_mod._MLflow, "log_round", full_disk)
    with caplog.at_level(logging.WARNING, logger="deltamask"):
        assert run_local(cfg, out, stop_after=3) == {"stopped_after": 3}
    assert "mlflow failed to log round 2" in caplog.text and "No space left on device" in caplog.text
    assert len(read_jsonl(out / "metrics.jsonl")) == 3  # the run went on
    client, run = mlflow_run(out)
    run_id = run.info.run_id
    assert run.info.status == "RUNNING" and run.info.run_name == "run"
    assert history(client, run_id, "accuracy") == expected(out, "accuracy")[:1]  # off after round 2
    saved = read_tracking(out)
    assert saved["tensorboard"] == {"logdir": "tensorboard", "logged_round": 3}
    from torch.utils.tensorboard import SummaryWriter

    # what a run killed in round 4 could leave: tracking.json written after round 2, TensorBoard events of
    # round 3 (logged, but not yet recorded as logged) and of round 4 (whose state was never saved)
    with SummaryWriter(str(out / "tensorboard")) as w:
        w.add_scalar("accuracy", 98.0, 3)
        w.add_scalar("accuracy", 99.0, 4)
    (out / "tracking.json").write_text(json.dumps({**saved, "tensorboard": {"logdir": "tensorboard", "logged_round": 2}}))
    monkeypatch.setattr(tracking_mod._MLflow, "log_round", real)
    summary = run_local(cfg, out, resume=True)
    assert summary["status"] == "completed"
    client, run = mlflow_run(out)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the same tracked run, ended
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["deltamask"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    rounds = [1, 2, 3, 4]
    for key in KEYS:
        want = expected(out, key)
        assert [s for s, _ in want] == rounds, key
        assert close(history(client, run_id, key), want), key
    scalars = tb_scalars(out / "tensorboard")
    for key in KEYS:
        assert close(scalars[key], expected(out, key)), (key, scalars[key])
    params = run.data.params
    assert params["method"] == "deltamask" and params["rounds"] == "4" and params["tracking"] == "tensorboard,mlflow"
    assert len(params) == len(cfg.to_dict())
    assert run.data.tags["deltamask.engine"] == "local"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert arts == {"accuracy.png", "bpp.png", "summary.json", "config.json", "metrics.jsonl", "model.safetensors"}
    local = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text()) == json.loads((out / "summary.json").read_text())
    tags = tb_tags(out / "tensorboard")
    assert set(tags["images"]) == {"accuracy", "bpp"}
    assert {"config/text_summary", "run/text_summary"} <= set(tags["tensors"])

    # an exported model folder goes to the same tracked runs (what `deltamask export` calls)
    export = tmp_path / "exported"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"onnx")
    (export / "labels.json").write_text("[]")
    done = log_export(out, export)
    assert set(done) == {"tensorboard", "mlflow"}
    assert {a.path for a in client.list_artifacts(run_id, "export")} == {"export/model.onnx", "export/labels.json"}
    assert "export/text_summary" in tb_tags(out / "tensorboard")["tensors"]
    assert log_export(tmp_path / "never-tracked", export) == {}


def test_a_failed_run_ends_its_tracked_run_failed(tmp_path) -> None:
    def no_client_answers(rnd: int, cid: int) -> None:
        raise RuntimeError("client down")

    from deltamask.errors import RunFailed

    out = tmp_path / "run"
    with pytest.raises(RunFailed):
        run_local(tiny_config(tracking="mlflow", max_skipped_rounds=1), out, fault=no_client_answers)
    client, run = mlflow_run(out)
    assert run.info.status == "FAILED"
    assert history(client, run.info.run_id, "failures") == [(1, 2.0)]  # both selected clients
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "summary.json" in arts and "model.safetensors" not in arts


def test_overwrite_replaces_the_run_folders_trackers(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(rounds=1, head_warmup_rounds=1, tracking="tensorboard")
    run_local(cfg, out)
    with pytest.raises(ConfigError, match="tensorboard"):  # a fresh run refuses a folder holding a tracked run
        run_local(cfg, out, overwrite=False)
    run_local(cfg, out, overwrite=True)
    assert tb_scalars(out / "tensorboard")["accuracy"] == expected(out, "accuracy")  # one run's events, not two


def test_compare_tracks_one_run_per_member_in_the_suites_experiment(tmp_path) -> None:
    from deltamask.app.compare import run_suite

    base = {**TINY, "rounds": 2, "tracking": "tensorboard,mlflow"}
    lines = ['title = "tracked suite"', "seeds = [0, 1]", "[base]"] + [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    lines += ["[[runs]]", 'name = "probe"', 'method = "linear-probe"']
    suite = tmp_path / "suite.toml"
    suite.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cmp"
    run_suite(suite, out, say=lambda m: None)
    from mlflow.tracking import MlflowClient

    root = out / "tracking"
    client = MlflowClient(tracking_mod.mlflow_uri(root / "mlruns"))
    exp = client.get_experiment_by_name("tracked suite")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["probe-s0", "probe-s1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        member = out / "runs" / r.info.run_name
        assert r.data.params["seed"] == r.info.run_name[-1]
        assert close(history(client, r.info.run_id, "accuracy"), expected(member, "accuracy"))
        assert close(tb_scalars(root / "tensorboard" / r.info.run_name)["accuracy"], expected(member, "accuracy"))
    assert sorted(p.name for p in (root / "tensorboard").iterdir()) == ["probe-s0", "probe-s1"]
    run_suite(suite, out, say=lambda m: None)  # finished members are skipped: still one run each
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_flower_server_app_tracks_through_its_run_config(tmp_path, monkeypatch) -> None:
    """The ServerApp (deployment and `deltamask flower simulate`) takes the keys from a run config as
    `flwr run --run-config` passes them (kebab-case strings) and tracks with the same driver."""
    pytest.importorskip("flwr")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "engines" / "flower"))  # flower_loopback
    from deltamask.engines.flower import make_client_app, run_server
    from flower_loopback import LoopbackGrid

    out = tmp_path / "flower"
    defaults = {**TINY, "rounds": 2, "out-dir": str(out)}
    run_config = {"tracking": "mlflow,tensorboard", "tracking-experiment": "fl"}
    run_server(LoopbackGrid(make_client_app(defaults), 3), run_config, defaults)
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["deltamask.engine"] == "flower"
    assert client.get_experiment(run.info.experiment_id).name == "fl"
    assert close(history(client, run.info.run_id, "total_bytes"), expected(out, "total_bytes"))
    assert close(tb_scalars(out / "tensorboard")["uplink_bpp"], expected(out, "uplink_bpp"))
    with pytest.raises(ConfigError, match="'tracking-dir' = .* is outside the server's output root"):
        run_server(LoopbackGrid(make_client_app(defaults), 3), {"tracking": "tensorboard", "tracking-dir": "/tmp/elsewhere",
                                                                "out-dir": str(tmp_path / "f2")}, defaults)
    assert not (tmp_path / "f2").exists()
    with pytest.raises(ConfigError, match="'tracking-dir' = 'rel' is relative"):
        run_server(LoopbackGrid(make_client_app(defaults), 3), {"tracking-dir": "rel", "out-dir": str(tmp_path / "f2")}, defaults)


def test_flower_simulate_passes_the_keys_and_refuses_a_missing_library_before_ray(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("flwr")
    import flwr.simulation

    import deltamask.engines.flower.server_app as server_app
    from deltamask.app.cli import main

    seen: list[dict] = []
    monkeypatch.setattr(server_app, "make_server_app", lambda defaults=None, out_root=None: seen.append(dict(defaults)))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **kw: None)
    sets = ["--set", "tracking=mlflow", "--set", "tracking-experiment=sim"]
    assert main(["flower", "simulate", *sets, "--out", str(tmp_path / "sim")]) == 1  # no ServerApp ran here
    assert seen[-1]["tracking"] == "mlflow" and seen[-1]["tracking_experiment"] == "sim"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    n = len(seen)
    assert main(["flower", "simulate", *sets, "--out", str(tmp_path / "sim2")]) == 2
    assert "pip install 'deltamask[tracking]'" in capsys.readouterr().err and len(seen) == n


def _watch_block() -> list[str]:
    """The commands of README.md's first bash block under "## Watch a run" (comments dropped)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("\n## Watch a run"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[: block.index("\n```")]
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


def test_readme_watch_a_run_example(tmp_path, monkeypatch) -> None:
    """Run the README example's deltamask commands (on the tiny setup: the README's own --set win), then read
    what the `tensorboard --logdir` and `mlflow ui --backend-store-uri` lines point at with the trackers'
    readers: one run, every round once, across the resume."""
    import shlex

    from mlflow.tracking import MlflowClient

    from deltamask.app.cli import main

    cmds = [shlex.split(c) for c in _watch_block()]
    assert cmds[0][:2] == ["pip", "install"] and "deltamask[tracking]" in cmds[0]
    monkeypatch.chdir(tmp_path)  # the example's relative paths land here
    tiny = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    runs = [c for c in cmds if c[0] == "deltamask"]
    assert [c[1] for c in runs] == ["run", "run"] and "--resume" in runs[1]
    for c in runs:
        assert main(c[1:] if "--resume" in c else [c[1], *tiny, *c[2:]]) == 0, c
    tb = next(c for c in cmds if c[0] == "tensorboard")
    ui = next(c for c in cmds if c[:2] == ["mlflow", "ui"])
    out = Path(runs[0][runs[0].index("--out") + 1])
    rounds = int(runs[1][-1].split("=")[1])
    want = expected(out, "accuracy")
    assert [s for s, _ in want] == list(range(1, rounds + 1))
    assert close(tb_scalars(Path(tb[tb.index("--logdir") + 1]))["accuracy"], want)
    client = MlflowClient(ui[ui.index("--backend-store-uri") + 1])
    (run,) = client.search_runs([client.get_experiment_by_name("deltamask").experiment_id])
    assert run.info.status == "FINISHED" and close(history(client, run.info.run_id, "accuracy"), want)


@pytest.mark.flower
@pytest.mark.slow
def test_flower_simulate_tracks_a_run(tmp_path) -> None:
    """`deltamask flower simulate` as a user runs it (Ray; about 50 s on 2 cores): one tracked run per tracker."""
    pytest.importorskip("flwr")
    import os
    import signal
    import subprocess

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", "from deltamask.app.cli import entry; entry()", "flower", "simulate", "--config",
           str(root / "examples" / "flower" / "tiny.toml"), "--set", "rounds=2", "--set", "tracking=tensorboard,mlflow",
           "--out", str(tmp_path / "out")]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    with (tmp_path / "output.txt").open("w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    output = (tmp_path / "output.txt").read_text(errors="replace")
    assert p.returncode == 0, output[-5000:]
    out = tmp_path / "out"
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["deltamask.engine"] == "flower"
    for key in ("accuracy", "total_bytes"):
        assert close(history(client, run.info.run_id, key), expected(out, key))
        assert close(tb_scalars(out / "tensorboard")[key], expected(out, key))
    assert "model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}

"""Crash safety (issue 10, item 5): ``deltamask run`` killed with SIGKILL at the real windows of a run
(see tests/run/crash_driver.py), then ``deltamask run --resume DIR``, ends exactly as the uninterrupted run:
the same metrics.jsonl (timings aside), the same state.safetensors, summary.json and model.safetensors,
and no stray file. Damaged state or artifact files give one clear error line; nothing a run writes is a
pickle, and the package never pickles.

The default suite runs one method at two kill points (a torn state write, and metrics one round ahead of
the state); ``-m slow`` runs every kill point for deltamask, fedpm, linear-probe and fedavg.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dmtest import TINY, assert_no_pickle
from deltamask.app.cli import EXIT_USER_ERROR, main
from deltamask.run.metrics import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "crash_driver.py"
ROUNDS = 3  # round 1: head warm-up (mask methods), rounds 2-3: mask rounds
RUN = {**TINY, "rounds": ROUNDS}
METHODS = ("deltamask", "fedpm", "linear-probe", "fedavg")
#: every kill point of crash_driver.py; the round is the one the process dies in
KILL_POINTS = ("metrics-torn:2", "metrics:2", "state-torn:2", "state-tmp:2", "state:2", "state:3", "artifact-torn", "summary")
NOT_COMPARED = (*TIMING_KEYS, "setup_seconds")


def _sets(method: str) -> list[str]:
    out = []
    for k, v in {**RUN, "method": method}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    # the same thread count as this process: float reductions then agree bit for bit with the in-process runs
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(extra)
    return env


def killed_run(out: Path, method: str, point: str) -> None:
    """``deltamask run`` in a child process that SIGKILLs itself at ``point``."""
    p = subprocess.run(
        [sys.executable, str(DRIVER), "run", "--out", str(out), *_sets(method)],
        env=_env(DM_KILL_AT=point), capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, f"not killed at {point}: rc={p.returncode}\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The uninterrupted run of each method (in-process CLI), made once per module."""
    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp(f"ref-{method}")
            assert main(["run", "--out", str(out), *_sets(method)]) == 0
            made[method] = out
        return made[method]

    return get


def _strip(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in NOT_COMPARED}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_run(ref: Path, out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no stray tmp file
    la, lb = (ref / "metrics.jsonl").read_text().splitlines(), (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lb] == list(range(1, ROUNDS + 1))
    assert [_strip(json.loads(x)) for x in la] == [_strip(json.loads(x)) for x in lb]
    for name in ("state.safetensors", "model.safetensors"):
        (ma, ta), (mb, tb) = _safetensors(ref / name), _safetensors(out / name)
        assert ma == mb, name
        assert sorted(ta) == sorted(tb), name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, f"{name}:{k}"
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{name}:{k}")
    sa, sb = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert sb["status"] == "completed" and sb["rounds_completed"] == ROUNDS
    assert _strip(sa) == _strip(sb)
    assert (ref / "config.json").read_bytes() == (out / "config.json").read_bytes()


def _kill_resume_compare(tmp_path: Path, reference, method: str, point: str) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    killed_run(out, method, point)
    # summary.json marks a finished run: it is written after the model, so only the last point has one
    assert (out / "summary.json").exists() == (point == "summary")
    assert (out / "model.safetensors").exists() == (point == "summary")
    assert main(["run", "--resume", str(out)]) == 0
    assert_same_run(reference(method), out)


# --- the default suite: one method, the two windows that matter most ---------------------------------
@pytest.mark.parametrize("point", ["state-torn:2", "metrics:2"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, point) -> None:  # noqa: ANN001
    _kill_resume_compare(tmp_path, reference, "deltamask", point)


# --- the full matrix -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_matrix(tmp_path, reference, method, point) -> None:  # noqa: ANN001
    _kill_resume_compare(tmp_path, reference, method, point)


@pytest.mark.slow
def test_sigkill_from_outside_at_an_arbitrary_moment(tmp_path, reference) -> None:  # noqa: ANN001
    """A plain external SIGKILL once round 2 is on disk (wherever the process then is) resumes equally."""
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "deltamask.app.cli", "run", "--out", str(out), *_sets("deltamask")],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and m.read_text().count("\n") >= 2 and (out / "state.safetensors").is_file():
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(60)
    assert main(["run", "--resume", str(out)]) == 0
    assert_same_run(reference("deltamask"), out)


@pytest.mark.slow
def test_killed_before_the_first_state_says_how_to_restart(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    killed_run(out, "deltamask", "metrics:1")
    assert main(["run", "--resume", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--overwrite" in err
    assert main(["run", "--out", str(out), "--overwrite", *_sets("deltamask")]) == 0


# --- metrics and state out of step (what the kill windows leave, made by hand) -----------------------
@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deltamask run stopped cleanly after round 2 (state at round 2)."""
    from deltamask.engines.local import run_local
    from dmtest import tiny_config

    out = tmp_path_factory.mktemp("stopped")
    run_local(tiny_config(rounds=ROUNDS), out, stop_after=2)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, stopped, reference) -> None:  # noqa: ANN001
    """A kill inside the metrics append leaves half a line of the round after the state's: resume drops it."""
    out = _copy(stopped, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "accur')
    assert main(["run", "--resume", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3]


def test_metrics_ahead_of_state_are_truncated_on_resume(tmp_path, stopped) -> None:  # noqa: ANN001
    out = _copy(stopped, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    extra = json.loads(lines[-1])
    extra["round"] = 3
    extra["accuracy"] = -1.0  # a line the state does not back: must not survive
    (out / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    assert main(["run", "--resume", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3] and recs[-1]["accuracy"] != -1.0


@pytest.mark.parametrize("damage", ["missing-round", "corrupt-middle-line"])
def test_metrics_behind_or_damaged_is_a_clear_error(tmp_path, stopped, capsys, damage) -> None:  # noqa: ANN001
    """The state says round 2 completed but metrics.jsonl cannot back it: refuse, do not write a wrong summary."""
    out = _copy(stopped, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    if damage == "missing-round":
        (out / "metrics.jsonl").write_text(lines[0] + "\n")
    else:
        (out / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    assert main(["run", "--resume", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("deltamask: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "metrics.jsonl" in err and "start" in err


# --- damaged files: one clear line, exit 2 --------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    b = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(b[:8], "little")
    if how == "empty":
        b = bytearray()
    elif how == "truncated-header":
        b = b[: header // 2]
    elif how == "truncated-data":
        b = b[: header + (len(b) - header) // 2]
    elif how == "last-byte-missing":
        b = b[:-1]
    elif how == "flipped-data":
        b[header + (len(b) - header) // 3] ^= 0x10
    elif how == "flipped-header":
        i = bytes(b).index(b'"deltamask')
        b[i + 1] ^= 0x01  # the metadata key no longer matches
    elif how == "garbage":
        b = bytearray(b"\x00garbage" * 50)
    path.write_bytes(bytes(b))


DAMAGES = ("empty", "truncated-header", "truncated-data", "last-byte-missing", "flipped-data", "flipped-header", "garbage")


def _one_line_error(code: int, capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("deltamask: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_state_is_a_clear_error(tmp_path, stopped, capsys, how) -> None:  # noqa: ANN001
    out = _copy(stopped, tmp_path / "run")
    _damage(out / "state.safetensors", how)
    err = _one_line_error(main(["run", "--resume", str(out)]), capsys)
    assert str(out / "state.safetensors") in err
    assert "corrupted" in err and "start again" in err


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_artifact_is_a_clear_error(tmp_path, reference, capsys, how) -> None:  # noqa: ANN001
    from PIL import Image

    from deltamask.run.artifact import ArtifactError, load_artifact

    out = _copy(reference("deltamask"), tmp_path / "run")
    model = out / "model.safetensors"
    _damage(model, how)
    with pytest.raises(ArtifactError, match="damaged"):
        load_artifact(model)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    err = _one_line_error(main(["predict", "--model", str(model), str(img)]), capsys)
    assert str(model) in err and f"--resume {out}" in err
    if how == "flipped-data":  # what the message says to do works: the run's state rebuilds the artifact
        assert main(["run", "--resume", str(out)]) == 0
        assert main(["predict", "--model", str(model), str(img)]) == 0


# --- no pickle -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["deltamask", "fedavg"])
def test_a_run_writes_no_pickle(reference, method) -> None:  # noqa: ANN001
    out = reference(method)
    names = {p.name for p in out.iterdir()}
    assert {"metrics.jsonl", "state.safetensors", "model.safetensors", "summary.json", "config.json"} <= names
    assert assert_no_pickle(out) >= 5


def test_pickle_detector_detects_pickles(tmp_path) -> None:
    import pickle

    (tmp_path / "a.json").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(AssertionError, match="pickle"):
        assert_no_pickle(tmp_path)


def _pickling_calls(tree: ast.AST) -> list[str]:
    """Calls and imports that can pickle or unpickle: pickle/dill/cloudpickle/joblib/shelve/marshal,
    torch.save, torch.load without weights_only=True, np.load without allow_pickle=False,
    np.save/savez of anything (object arrays pickle) unless allow_pickle=False is passed."""
    bad = []
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "_pickle"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in banned_modules]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
            bad.append(node.module or "")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            kw = {k.arg: k.value for k in node.keywords}
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""

            def const(key: str) -> Any:
                v = kw.get(key)
                return v.value if isinstance(v, ast.Constant) else None

            if owner == "torch" and name == "save":
                bad.append(f"torch.save (line {node.lineno})")
            elif owner == "torch" and name == "load" and const("weights_only") is not True:
                bad.append(f"torch.load without weights_only=True (line {node.lineno})")
            elif owner in ("np", "numpy") and name == "load" and const("allow_pickle") is not False:
                bad.append(f"np.load without allow_pickle=False (line {node.lineno})")
            elif owner in ("np", "numpy") and name in ("save",) and const("allow_pickle") is not False:
                bad.append(f"np.{name} without allow_pickle=False (line {node.lineno})")
    return bad


def test_the_package_never_pickles() -> None:
    src = ROOT / "src" / "deltamask"
    files = sorted(src.rglob("*.py"))
    assert len(files) > 20
    found = {str(p.relative_to(src)): b for p in files if (b := _pickling_calls(ast.parse(p.read_text())))}
    assert found == {}
    # the scanner itself finds what it looks for
    assert len(_pickling_calls(ast.parse("import pickle\nimport torch\ntorch.save(m, 'x.pt')\ntorch.load('x.pt')\n"))) == 3

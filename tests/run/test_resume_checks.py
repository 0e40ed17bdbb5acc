"""Resume trusts nothing in its folder (issue 22): a ``state.safetensors`` whose arrays have the wrong shape
for the run's config or hold a NaN (even with a matching checksum: anyone who can write the folder can
recompute it) is refused with one clear line, before any round runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmtest import tiny_config
from deltamask.engines.local import run_local
from deltamask.run.state import StateError, load_state, save_state

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):  # noqa: ANN201
    """A tiny run stopped after round 1 (a head round), resumable."""
    out = tmp_path_factory.mktemp("stopped")
    cfg = tiny_config(rounds=3)
    run_local(cfg, out, stop_after=1)
    return cfg, out


def damaged(tmp_path: Path, stopped, change) -> Path:  # noqa: ANN001
    cfg, src = stopped
    out = tmp_path / "run"
    out.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    state, clients, saved, engine = load_state(out)
    change(state, clients)
    save_state(out, state, clients, saved, engine=engine)  # the checksum matches the damage
    return out


def resume_fails(cfg, out: Path, match: str) -> None:  # noqa: ANN001
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(StateError, match=match):
        run_local(cfg, out, resume=True)
    assert (out / "metrics.jsonl").read_text() == before  # refused before any round


def test_an_undamaged_state_resumes(tmp_path, stopped) -> None:
    out = damaged(tmp_path, stopped, lambda s, c: None)
    assert run_local(stopped[0], out, resume=True)["status"] == "completed"


@pytest.mark.parametrize("name", ["theta", "head_weight", "head_bias"])
def test_a_server_array_of_the_wrong_shape_is_refused(tmp_path, stopped, name) -> None:
    def change(s, c):  # noqa: ANN001, ANN202
        a = getattr(s, name)
        setattr(s, name, np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]).astype(a.dtype))

    out = damaged(tmp_path, stopped, change)
    resume_fails(stopped[0], out, rf"server/{name} has shape \(\d+,\), this run's config gives \([\d, ]+\); delete the output folder")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["theta", "head_weight", "head_bias"])
def test_a_non_finite_server_array_is_refused(tmp_path, stopped, name, value) -> None:
    def change(s, c):  # noqa: ANN001, ANN202
        getattr(s, name).reshape(-1)[0] = value

    out = damaged(tmp_path, stopped, change)
    resume_fails(stopped[0], out, rf"holds non-finite values \(server/{name}\)")


def test_a_non_finite_client_cache_is_refused(tmp_path, stopped) -> None:
    def change(s, c):  # noqa: ANN001, ANN202
        cid = sorted(c)[0]
        key = next(k for k, v in c[cid].items() if isinstance(v, np.ndarray) and v.dtype.kind == "f")
        c[cid][key] = c[cid][key].copy()
        c[cid][key].reshape(-1)[0] = np.nan

    out = damaged(tmp_path, stopped, change)
    resume_fails(stopped[0], out, r"holds non-finite values \(client/\d+/")


def test_posterior_arrays_and_history_of_the_wrong_length_are_refused(tmp_path, stopped) -> None:
    def counts(s, c):  # noqa: ANN001, ANN202
        s.counts = np.zeros(s.theta.size + 1, np.uint16)  # present, so N entries

    out = damaged(tmp_path, stopped, counts)
    resume_fails(stopped[0], out, r"server/counts has shape \(\d+,\), this run's config gives")


def test_a_client_cache_of_the_wrong_shape_is_refused(tmp_path, stopped) -> None:
    def change(s, c):  # noqa: ANN001, ANN202
        cid = sorted(c)[0]
        key = next(k for k in ("head_weight", "theta") if k in c[cid])
        c[cid][key] = c[cid][key].reshape(-1)[:-1].copy()

    out = damaged(tmp_path, stopped, change)
    resume_fails(stopped[0], out, r"client/\d+/(head_weight|theta) has shape")


def test_a_client_id_outside_the_run_is_refused(tmp_path, stopped) -> None:
    n = stopped[0].num_clients

    def change(s, c):  # noqa: ANN001, ANN202
        s.client_head_version[n] = 0  # exactly one past the last client

    out = damaged(tmp_path, stopped, change)
    resume_fails(stopped[0], out, rf"names clients \[{n}\], outside 0..{n - 1}")


def test_the_cli_says_it_in_one_line(tmp_path, stopped) -> None:
    def change(s, c):  # noqa: ANN001, ANN202
        s.theta[0] = np.nan

    out = damaged(tmp_path, stopped, change)
    p = subprocess.run([sys.executable, "-m", "deltamask.app.cli", "run", "--resume", str(out)], capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "holds non-finite values (server/theta)" in lines[0], p.stderr

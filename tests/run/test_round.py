"""The one round driver (deltamask.run.round): failures end a run loudly, out-dirs are not overwritten by
accident, and a run written by one engine resumes to the uninterrupted result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from dmtest import TINY, VirtualClock, tiny_config
from deltamask.app.cli import EXIT_RUN_FAILED, EXIT_USER_ERROR, main
from deltamask.config import METHOD_NAMES, ConfigError, build_config
from deltamask.engines.local import run_local
from deltamask.errors import RunFailed
from deltamask.run.metrics import TIMING_KEYS, read_jsonl
from deltamask.run.round import RUN_FILES, select_clients
from deltamask.run.state import StateError


def _sets(**kw: object) -> list[str]:
    out = []
    for k, v in {**TINY, **kw}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _all_down(rnd: int, cid: int) -> None:
    raise RuntimeError("node on fire")


def test_method_names_in_config_match_the_registry() -> None:
    from deltamask.methods import METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)


def test_too_many_skipped_rounds_fail_the_run(tmp_path) -> None:
    cfg = tiny_config(rounds=5, max_skipped_rounds=2)
    with pytest.raises(RunFailed, match="2 consecutive rounds .* no update") as e:
        run_local(cfg, tmp_path, fault=lambda r, c: _all_down(r, c) if r >= 2 else None)
    assert "node on fire" in str(e.value)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3]  # stopped as soon as the streak reached 2
    assert [r["skipped_update"] for r in recs] == [False, True, True]
    assert all(f["kind"] == "error" for r in recs[1:] for f in r["failures"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "consecutive" in summary["failure"]
    assert not (tmp_path / "model.safetensors").exists()


def test_a_run_without_a_single_update_fails_even_when_short(tmp_path) -> None:
    cfg = tiny_config(rounds=2, max_skipped_rounds=0)  # never fail for a streak, but never updating is a failure
    with pytest.raises(RunFailed, match="no round updated the model"):
        run_local(cfg, tmp_path, fault=_all_down)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert not (tmp_path / "model.safetensors").exists()


def test_skips_below_the_limit_complete(tmp_path) -> None:
    cfg = tiny_config(rounds=3, max_skipped_rounds=2)
    s = run_local(cfg, tmp_path, fault=lambda r, c: _all_down(r, c) if r == 2 else None)
    assert s["status"] == "completed" and (tmp_path / "model.safetensors").is_file()


def test_min_replies_above_clients_per_round_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_replies"):
        build_config({**TINY, "min_replies": 3, "clients_per_round": 2})


def test_cli_exit_codes_for_failed_runs_and_used_folders(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets(rounds=1, head_warmup_rounds=1)]) == 0
    capsys.readouterr()
    assert main(["run", "--out", str(out), *_sets(rounds=1, head_warmup_rounds=1)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert main(["run", "--out", str(out), "--overwrite", *_sets(rounds=1, head_warmup_rounds=1, seed=3)]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 3


def test_cli_failed_run_exits_1(tmp_path, capsys, monkeypatch) -> None:
    import deltamask.engines.local as local

    monkeypatch.setattr(local.LocalTransport, "exchange", _no_replies)
    assert main(["run", "--out", str(tmp_path / "r"), *_sets(rounds=2)]) == EXIT_RUN_FAILED
    assert "run failed: no round updated the model" in capsys.readouterr().err


def _no_replies(self, round_, downlinks):  # noqa: ANN001, ANN202
    from deltamask.run.transport import Exchange
    from deltamask.methods import Failure

    return Exchange(failures={c: Failure(c, "unreachable", "timeout") for c in downlinks})


def test_preset_with_engine_keys_works_with_deltamask_run(tmp_path, capsys) -> None:
    preset = tmp_path / "p.toml"
    out = tmp_path / "from-preset"
    body = "".join(f"{k.replace('_', '-')} = {json.dumps(v)}\n" for k, v in {**TINY, "rounds": 1, "head_warmup_rounds": 1}.items())
    preset.write_text(body + f'out-dir = "{out}"\nround-timeout = 30.0\n')
    assert main(["run", "--config", str(preset)]) == 0
    assert (out / "summary.json").is_file()


def _comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS and not k.startswith("downlink")}


def test_resume_without_client_caches_resends_them_and_matches(tmp_path) -> None:
    """A state whose clients' caches are gone (as after Flower, whose nodes hold them) resumes to exactly
    the uninterrupted result: the server forgets what the clients held and re-sends it."""
    cfg = tiny_config(rounds=4, clients_per_round=2)
    run_local(cfg, tmp_path / "full")
    run_local(cfg, tmp_path / "cut", stop_after=2)
    from deltamask.run.state import load_state, save_state

    state, clients, saved, _ = load_state(tmp_path / "cut")
    assert clients  # the local engine keeps them...
    save_state(tmp_path / "cut", state, {}, saved, engine="flower")  # ...a Flower state has none
    run_local(cfg, tmp_path / "cut", resume=True)
    a, b = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [_comparable(r) for r in a] == [_comparable(r) for r in b]
    assert b[2]["downlink_bits"] > a[2]["downlink_bits"]  # round 3 re-sent theta/head
    sa, sb = load_file(str(tmp_path / "full" / "state.safetensors")), load_file(str(tmp_path / "cut" / "state.safetensors"))
    for k in [k for k in sa if k.startswith("server/")]:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_resume_refuses_lost_client_memory(tmp_path) -> None:
    cfg = tiny_config(method="topk", rounds=3)
    run_local(cfg, tmp_path, stop_after=2)
    from deltamask.run.state import load_state, save_state

    state, _, saved, _ = load_state(tmp_path)
    save_state(tmp_path, state, {}, saved, engine="flower")
    with pytest.raises(StateError, match="error feedback"):
        run_local(cfg, tmp_path, resume=True)


def test_resume_with_another_config_is_refused(tmp_path) -> None:
    run_local(tiny_config(rounds=3), tmp_path, stop_after=1)
    with pytest.raises(ConfigError, match="lr="):
        run_local(tiny_config(rounds=3, lr=0.5), tmp_path, resume=True)
    s = run_local(tiny_config(rounds=3, progress=True), tmp_path, resume=True)  # progress does not change the result
    assert s["rounds_completed"] == 3


def test_refused_folder_is_left_untouched(tmp_path) -> None:
    run_local(tiny_config(rounds=1, head_warmup_rounds=1), tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in RUN_FILES if (tmp_path / f).is_file()}
    with pytest.raises(ConfigError, match="already holds a run"):
        run_local(tiny_config(rounds=1, head_warmup_rounds=1, seed=5), tmp_path, overwrite=False)
    assert before == {f: (tmp_path / f).read_bytes() for f in RUN_FILES if (tmp_path / f).is_file()}


def test_selection_draws_from_available_clients_only() -> None:
    cfg = tiny_config(num_clients=6, clients_per_round=3)
    assert select_clients(cfg, 4) == select_clients(cfg, 4, list(range(6)))
    sel = select_clients(cfg, 4, [1, 4])
    assert sel == [1, 4]


def test_preset_engine_keys_are_honoured_or_refused(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    body = "".join(f"{k.replace('_', '-')} = {json.dumps(v)}\n" for k, v in {**TINY, "rounds": 1, "head_warmup_rounds": 1}.items())
    keep = tmp_path / "keep.toml"
    keep.write_text(body + f'out-dir = "{out}"\n')
    assert main(["run", "--config", str(keep)]) == 0
    assert main(["run", "--config", str(keep)]) == EXIT_USER_ERROR  # the folder holds a run
    assert "already holds a run" in capsys.readouterr().err
    replace = tmp_path / "replace.toml"
    replace.write_text(body + f'out-dir = "{out}"\noverwrite = true\n')
    assert main(["run", "--config", str(replace)]) == 0  # the preset's overwrite counts
    resume = tmp_path / "resume.toml"
    resume.write_text(body + f'out-dir = "{out}"\nresume = true\n')
    assert main(["run", "--config", str(resume)]) == EXIT_USER_ERROR  # not silently a fresh run
    assert "--resume DIR" in capsys.readouterr().err


def test_local_round_timeout_only_when_set(tmp_path, monkeypatch) -> None:
    import deltamask.engines.local as local

    clock = VirtualClock()  # only the scripted hang advances it, so the test does not depend on load
    monkeypatch.setattr(local, "time", clock)

    def slow(rnd: int, cid: int) -> None:
        if (rnd, cid) == (2, 0):
            clock.now += 0.6
        return None

    cfg = tiny_config(rounds=2, clients_per_round=3)
    run_local(cfg, tmp_path / "a", fault=slow, round_timeout=0.5)
    r2 = read_jsonl(tmp_path / "a" / "metrics.jsonl")[1]
    assert [(f["client"], f["kind"]) for f in r2["failures"]] == [(0, "timeout")], r2["failures"]
    assert "round-timeout 0.5 s (took 0.6 s)" in r2["failures"][0]["reason"]
    run_local(cfg, tmp_path / "b", fault=slow)  # unset: the slow client is waited for
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl")[1]["failures"] == []


def test_engine_keys_through_set(tmp_path, capsys) -> None:
    from deltamask.app.cli import main

    out = tmp_path / "o"
    sets = [f"{k}={v}" for k, v in TINY.items()] + ["rounds=1", f"out-dir={out}"]
    args = ["run"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0 and (out / "summary.json").is_file()  # --set out-dir is where it went
    assert main(args + ["--set", "resume=true"]) == 2
    assert "--resume DIR" in capsys.readouterr().err

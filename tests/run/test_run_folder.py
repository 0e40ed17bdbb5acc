"""The run folder (issue 22, local hardening): one run at a time, and no write or delete through a symlink.

A second run into a folder that a live run holds is refused naming the holder's pid; the lock of a dead
run is taken over; a symlink planted under a run file's name is replaced or refused, never followed, and
``overwrite`` removes the link, not what it points at."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dmtest import tiny_config
from deltamask.config import ConfigError
from deltamask.engines.local import run_local
from deltamask.run.files import LOCK_FILE, RunLock, append_line, clean_stale_tmp, remove_entry, save_atomic, write_atomic
from deltamask.run.round import RUN_FILES

SRC = str(Path(__file__).resolve().parents[2] / "src")


def hold_lock(folder: Path) -> subprocess.Popen:
    """A live process holding the folder's run lock (as a second deltamask run or a leftover ServerApp would)."""
    code = textwrap.dedent(f"""
        import sys, time
        from deltamask.run.files import RunLock
        RunLock({str(folder)!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path) -> None:
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(ConfigError, match=rf"output folder .* is in use by another run \(pid {holder.pid}, since .*wait for it"):
            run_local(tiny_config(rounds=1), out)
        assert not (out / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path, caplog) -> None:
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)  # dies holding it: nothing released it by hand
    holder.wait()
    assert (out / LOCK_FILE).read_text().split()[0] == str(holder.pid)
    with caplog.at_level(logging.INFO, logger="deltamask"), RunLock(out) as lock:
        assert lock.took_over == holder.pid
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert f"taking over the lock of pid {holder.pid}, which is no longer running" in caplog.text
    assert (out / LOCK_FILE).read_text() == ""  # released: no holder named
    s = run_local(tiny_config(rounds=1), out)  # and a run goes ahead
    assert s["status"] == "completed"


def test_a_lock_is_exclusive_within_one_process_too(tmp_path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again once released


def test_a_symlinked_lock_file_is_refused(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match="is a symlink: refused"):
        RunLock(tmp_path / "run").acquire()
    assert victim.read_text() == "precious"


def test_writes_replace_a_planted_symlink_and_never_follow_it(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "summary.json"
    link.symlink_to(victim)
    write_atomic(link, "{}")
    assert victim.read_text() == "precious" and not link.is_symlink() and link.read_text() == "{}"
    link.unlink()
    link.symlink_to(victim)
    save_atomic(link, lambda tmp: Path(tmp).write_bytes(b"model"))
    assert victim.read_text() == "precious" and not link.is_symlink() and link.read_bytes() == b"model"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


def test_a_file_written_gets_the_usual_mode_not_mkstemps_0600(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_appending_through_a_symlink_is_refused(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ConfigError, match="metrics.jsonl is a symlink: a run never writes through one"):
        append_line(tmp_path / "metrics.jsonl", "{}")
    assert victim.read_text() == "precious\n"
    append_line(tmp_path / "real.jsonl", "{}")
    append_line(tmp_path / "real.jsonl", "[]")
    assert (tmp_path / "real.jsonl").read_text() == "{}\n[]\n"


def test_overwrite_removes_the_links_not_what_they_point_at(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / "metrics.jsonl").symlink_to(victim)
    (out / "model.safetensors").symlink_to(victim_dir)  # a link to a folder: rmtree would refuse or recurse
    s = run_local(tiny_config(rounds=1), out, overwrite=True)
    assert s["status"] == "completed"
    assert victim.read_text() == "precious" and (victim_dir / "keep.txt").read_text() == "precious"
    assert not (out / "metrics.jsonl").is_symlink() and not (out / "model.safetensors").is_symlink()


def test_remove_entry_removes_names(tmp_path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "f").write_text("x")
    (tmp_path / "link").symlink_to(target)
    remove_entry(tmp_path / "link")
    assert (target / "f").exists()
    remove_entry(target)
    assert not target.exists()


def test_a_killed_writers_temporary_files_are_cleaned_and_only_those(tmp_path) -> None:
    for name in (".state.safetensors.abc123.tmp", ".summary.json.x.tmp", ".other.tmp", "notes.tmp"):
        (tmp_path / name).write_text("x")
    assert sorted(clean_stale_tmp(tmp_path, RUN_FILES)) == [".state.safetensors.abc123.tmp", ".summary.json.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "notes.tmp"]


def test_the_lock_is_released_when_the_run_fails(tmp_path) -> None:
    out = tmp_path / "run"
    run_local(tiny_config(rounds=1), out)
    with pytest.raises(ConfigError):
        run_local(tiny_config(rounds=1), out, overwrite=False)  # refused: a run is there
    t0 = time.time()
    with RunLock(out):  # not left held by the refused run
        pass
    assert time.time() - t0 < 5

"""The node worker's runtime folder is trusted only when it is private (issue 22, local hardening).

Without ``XDG_RUNTIME_DIR`` the folder is ``/tmp/deltamask-<uid>``: another local user could pre-create it,
plant a socket the ClientApp would talk to, or symlink the worker's log or lock elsewhere. Each case is
refused with a clear error before anything is sent or written."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from deltamask.engines.flower import worker
from deltamask.engines.flower.worker import WorkerClient, WorkerError, check_private_dir, worker_dir

pytestmark = pytest.mark.flower


@pytest.fixture
def wdir(tmp_path, monkeypatch):  # noqa: ANN201
    d = tmp_path / "w"
    monkeypatch.setenv("DELTAMASK_WORKER_DIR", str(d))
    return d


def test_a_missing_folder_is_created_private(wdir) -> None:
    assert worker_dir() == wdir
    st = os.lstat(wdir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    worker_dir()  # and accepted again as it is


def test_the_default_folder_without_xdg_is_per_user_in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DELTAMASK_WORKER_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(worker.tempfile, "gettempdir", lambda: str(tmp_path))
    d = worker_dir()
    assert d == tmp_path / f"deltamask-{os.getuid()}" and stat.S_IMODE(os.lstat(d).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o710, 0o701, 0o770, 0o777])
def test_a_precreated_folder_that_others_can_use_is_refused(wdir, mode) -> None:
    wdir.mkdir()
    os.chmod(wdir, mode)
    with pytest.raises(WorkerError, match=rf"has mode {mode:04o}: group or others can use it; refused"):
        worker_dir()


def test_mode_0700_is_the_edge_that_is_accepted(wdir) -> None:
    wdir.mkdir()
    os.chmod(wdir, 0o700)
    assert worker_dir() == wdir
    os.chmod(wdir, 0o500)  # fewer rights for the owner: still private
    check_private_dir(wdir)
    os.chmod(wdir, 0o700)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_of_another_owner_is_refused(wdir) -> None:
    wdir.mkdir(mode=0o700)
    os.chown(wdir, 12345, -1)
    with pytest.raises(WorkerError, match=r"belongs to uid 12345, not to this user .*another user could plant a socket"):
        worker_dir()


def test_a_symlinked_folder_is_refused_even_to_a_private_one(wdir, tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    wdir.symlink_to(real)
    with pytest.raises(WorkerError, match=r"is a symlink .* not a directory: refused"):
        worker_dir()


def test_a_file_in_place_of_the_folder_is_refused(wdir) -> None:
    wdir.write_text("x")
    with pytest.raises(WorkerError, match="is not a directory: refused"):
        worker_dir()


@pytest.mark.parametrize("suffix", [".log", ".lock"])
def test_a_symlinked_log_or_lock_is_never_followed(wdir, tmp_path, suffix) -> None:
    anchor = subprocess.Popen(["sleep", "60"])
    try:
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        worker_dir()
        link = (wdir / f"node-{anchor.pid}").with_suffix(suffix)
        link.symlink_to(victim)
        with pytest.raises(WorkerError, match=rf"{link.name} is a symlink: refused"):
            WorkerClient(anchor=anchor.pid).call({"op": "ping"})
        assert victim.read_text() == "precious\n"  # nothing written through the link
    finally:
        anchor.kill()
        anchor.wait()


def test_the_worker_itself_refuses_to_listen_in_a_shared_folder(wdir) -> None:
    wdir.mkdir()
    os.chmod(wdir, 0o777)
    with pytest.raises(WorkerError, match="has mode 0777"):
        worker.serve(wdir / "node-1.sock", os.getpid(), 0)
    assert not (wdir / "node-1.sock").exists()


def test_the_tail_of_a_symlinked_log_is_not_read(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not show")
    link = tmp_path / "x.log"
    link.symlink_to(secret)
    assert worker._tail(link) == "(no log)"
    real = tmp_path / "y.log"
    real.write_text("a" * 3000 + "END")
    assert worker._tail(real, 10) == "a" * 7 + "END"

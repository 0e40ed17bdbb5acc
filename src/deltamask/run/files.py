"""The run folder as a file system object: one run at a time, and never a write through a symlink.

* :class:`RunLock` -- a run (local, simulated or a Flower ServerApp) holds an exclusive ``flock`` on
  ``OUT/.deltamask.lock`` while it writes the folder. A second run into the same folder (a leftover ServerApp,
  the same command started twice) is refused naming the holder's pid. The kernel drops the lock when its
  process dies, so the lock of a dead run is taken over (and said so) without anyone deleting a file.
* :func:`write_atomic` / :func:`save_atomic` -- a file is written to a fresh temporary file in the same folder
  (``mkstemp``: created exclusively, never an existing name or symlink), synced, then ``os.replace``-d over
  the name: a symlink planted under a run file's name is replaced, never followed.
* :func:`append_line` -- appends (``metrics.jsonl``) open with ``O_NOFOLLOW``: a symlink is refused.
* :func:`remove_entry` -- ``overwrite`` removes a run file's *name*: a symlink is unlinked, never what it
  points at.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..config import ConfigError

log = logging.getLogger("deltamask")

LOCK_FILE = ".deltamask.lock"


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fresh_tmp(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
    return fd, Path(name)


def _replace_atomically(path: str | Path, fill: Callable[[int, str], None]) -> Path:
    """``fill(fd, tmp_name)`` writes the content of a fresh temporary file beside ``path`` (through the
    descriptor or by name); the file is then synced through the descriptor :func:`_fresh_tmp` opened and
    moved over ``path`` (replacing a symlink there, never following it). A failure removes the temporary."""
    p = Path(path)
    fd, tmp = _fresh_tmp(p)
    try:
        fill(fd, str(tmp))
        os.fsync(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return p


def save_atomic(path: str | Path, writer: Callable[[str], None]) -> Path:
    """``writer(tmp_name)`` writes the file's content to a fresh temporary name beside ``path`` (for writers
    that take a file name: safetensors, matplotlib); then as :func:`_replace_atomically`."""
    return _replace_atomically(path, lambda fd, tmp: writer(tmp))


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, without following a symlink there."""
    raw = data.encode() if isinstance(data, str) else data

    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(raw)

    return _replace_atomically(path, fill)


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (a newline added) and sync; a symlink at ``path`` is refused (``ConfigError``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink: a run never writes through one; remove it") from None
        raise
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def clean_stale_tmp(folder: str | Path, names: tuple[str, ...]) -> list[str]:
    """Remove the temporary files that a killed writer of one of ``names`` left in ``folder``
    (``.<name>.<random>.tmp``); call it holding the folder's :class:`RunLock`. Returns what was removed."""
    gone = []
    for name in names:
        for p in Path(folder).glob(f".{name}.*.tmp"):
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def remove_entry(p: Path) -> None:
    """Remove the name ``p``: a file or a symlink (the link itself, never its target) or a real folder."""
    st = os.lstat(p)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder for as long as a run writes it (a context manager, or
    :meth:`acquire` / :meth:`release`). Refused with :class:`ConfigError` naming the holder while another
    process holds it; the lock of a dead process is taken over."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.took_over: int | None = None  # the pid of a dead run whose lock this one took over

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"{self.path} is a symlink: refused (a run folder's lock is never followed elsewhere); remove it") from None
            raise ConfigError(f"cannot open the run folder's lock {self.path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock the run folder {self.folder} ({e})") from None
            who = f"pid {holder[0]}" if holder and holder[0].isdigit() else "another process"
            since = ""
            if len(holder) > 1:
                try:
                    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder[1])))}"
                except ValueError:
                    pass
            raise ConfigError(
                f"output folder {str(self.folder)!r} is in use by another run ({who}{since}; lock {self.path}): "
                "wait for it to finish, stop that process, or choose another folder"
            ) from None
        old = os.pread(fd, 200, 0).decode(errors="replace").split()
        if old and old[0].isdigit() and int(old[0]) != os.getpid() and not _alive(int(old[0])):
            self.took_over = int(old[0])
            log.info("run folder %s: taking over the lock of pid %d, which is no longer running", self.folder, self.took_over)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # a finished run leaves no holder behind
            finally:
                os.close(self.fd)  # closing drops the flock
                self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

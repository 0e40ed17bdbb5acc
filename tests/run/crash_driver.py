"""Run the ``deltamask`` CLI and SIGKILL it at one chosen point (used by test_crash_safety.py).

    DM_KILL_AT=POINT[:ROUND] python tests/run/crash_driver.py run --out DIR --set ...

The points are the real windows of :func:`deltamask.run.round.run_rounds` (per round: append the
metrics line, then save_state = write a temporary ``.state.safetensors.<random>.tmp``, fsync, ``os.replace``;
at the end: ``model.safetensors`` via its own temporary file, then ``summary.json``, then the plots):

``metrics-torn:K``     half of round K's metrics line is on disk, no newline, nothing else
``metrics:K``          round K's metrics line is on disk, its state is not (metrics one round ahead)
``state-torn:K``       round K's state tmp file is half written; the old state is in place
``state-tmp:K``        round K's state tmp file is complete (and fsynced), ``os.replace`` has not run
``state:K``            round K's state is in place (a clean kill between rounds)
``artifact-torn``      the model's temporary file is half written, ``model.safetensors`` and summary.json do not exist
``summary``            the artifact and summary.json are written, the plots are not

The process kills *itself* with SIGKILL at that point, so no ``finally``, ``atexit`` or buffered write
runs: what is on disk is exactly what a crash there would leave. Nothing of this lives in the library.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

POINTS = ("metrics-torn", "metrics", "state-torn", "state-tmp", "state", "summary", "artifact-torn")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, round_: int | None) -> None:
    import safetensors.numpy as stn

    import deltamask.run.round as rnd
    import deltamask.run.state as st

    if point not in POINTS:
        raise SystemExit(f"unknown kill point {point!r}; valid: {', '.join(POINTS)}")

    real_append = rnd.append_jsonl

    def append_jsonl(path: Any, record: dict[str, Any]) -> None:
        if record.get("round") == round_ and point == "metrics-torn":
            line = json.dumps(record, sort_keys=True) + "\n"
            with open(path, "a") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        real_append(path, record)
        if record.get("round") == round_ and point == "metrics":
            die()

    rnd.append_jsonl = append_jsonl

    real_save_file = stn.save_file

    def save_file(tensors: dict[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
        real_save_file(tensors, filename, metadata=metadata)
        name = Path(filename).name  # run/files.py's temporary names: .<final name>.<random>.tmp
        final = name[1:].rsplit(".", 2)[0] if name.startswith(".") and name.endswith(".tmp") else name
        if final == st.STATE_FILE and point in ("state-torn", "state-tmp"):
            if json.loads((metadata or {})["deltamask"])["round"] != round_:
                return
        elif not (final == "model.safetensors" and point == "artifact-torn"):
            return
        if point.endswith("-torn"):
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
                os.fsync(f.fileno())
        die()

    stn.save_file = save_file  # save_state and save_artifact import it at call time

    real_save_state = rnd.save_state

    def save_state(directory: Any, state: Any, *a: Any, **kw: Any) -> Path:
        out = real_save_state(directory, state, *a, **kw)
        if point == "state" and state.round == round_:
            die()
        return out

    rnd.save_state = save_state

    real_write_json = rnd.write_json

    def write_json(path: Any, obj: dict[str, Any]) -> None:
        real_write_json(path, obj)
        if point == "summary" and Path(path).name == "summary.json":
            die()

    rnd.write_json = write_json


def main() -> int:
    spec = os.environ.get("DM_KILL_AT", "")
    if spec:
        point, _, r = spec.partition(":")
        install(point, int(r) if r else None)
    from deltamask.app.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

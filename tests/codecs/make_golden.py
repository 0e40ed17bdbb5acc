"""Regenerate tests/codecs/golden/*.bin: ``PYTHONPATH=src python tests/codecs/make_golden.py``.

Only do this for a deliberate wire-format change (and bump container.FORMAT_VERSION or the codec's
params when old payloads can no longer be read). ``DELTAMASK_REGEN_GOLDEN=1 pytest tests/codecs``
does the same from the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _samples import encode_sample  # noqa: E402

from deltamask.codecs import available_codecs  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"


def regenerate() -> list[Path]:
    GOLDEN.mkdir(exist_ok=True)
    out = []
    for name in available_codecs():
        if name == "auto":
            continue  # writes another codec's container
        path = GOLDEN / f"{name}.bin"
        path.write_bytes(encode_sample(name))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in regenerate():
        print(p)

"""Run the codec benchmark: ``python benchmarks/bench_codecs.py [--out DIR] [--n N] [--fractions ...] [--repeats R]``.

Same as ``deltamask bench codecs``; see :mod:`deltamask.app.bench`. Writes codecs.json and codecs.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deltamask.app.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["codecs", *sys.argv[1:]]))

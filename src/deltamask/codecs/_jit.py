"""Optional numba JIT: ``njit``/``prange`` that degrade to plain Python when numba is missing.

numba is used only where numpy cannot reach the targets (filter peeling is inherently sequential;
query-all of 86M indices is ~28 ns/key in numpy, REFERENCE.md). Without numba the same functions run
as pure Python: correct, but only practical for small sets. ``HAVE_NUMBA`` tells which one runs.
"""

from __future__ import annotations

import os
from typing import Any, Callable

try:  # pragma: no cover - exercised implicitly
    if os.environ.get("DELTAMASK_NO_NUMBA"):
        raise ImportError("disabled by DELTAMASK_NO_NUMBA")
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False
    prange = range

    def njit(*args: Any, **kwargs: Any) -> Callable:
        """No-op stand-in for ``numba.njit`` (with or without arguments)."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f


def num_threads() -> int:
    """Threads numba's parallel loops use (1 without numba)."""
    return int(numba.get_num_threads()) if HAVE_NUMBA else 1


__all__ = ["HAVE_NUMBA", "njit", "num_threads", "prange"]

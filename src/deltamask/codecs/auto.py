"""``auto``: per payload, the smallest index codec whose expected false positives fit a budget.

``AutoCodec(max_false_positives=0.0)`` (the registry default) only admits exact codecs, so it is
lossless unless told otherwise. A budget admits filters too: ``max_false_positives`` is the largest
expected number of false members per payload (absolute), or, with ``per_key=True``, per encoded
key (e.g. 0.01 = at most 1 false flip per 100 real ones). A filter's expectation is
``(n - k) * 2^-b`` (:meth:`IndexCodec.expected_false_positives`).

``auto`` writes the chosen codec's own container, so ``codec_of(payload).name`` tells which codec
was used and any receiver decodes it without knowing ``auto`` exists. Its id (19) is reserved and
never written; :meth:`decode` dispatches on the payload's header.

Choice: candidates are ranked by :meth:`IndexCodec.estimate_bits`; every admissible candidate
whose estimate is within ``slack`` (default 3%) of the best estimate is actually encoded, and the
smallest real payload wins (ties: the lower codec id). Filters' estimates are exact; exact codecs'
are within ~1%, so the winner is the truly smallest candidate in practice.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import IndexCodec, available_codecs, check_indices, codec_of, get_codec, register
from .container import CodecError


@register
class AutoCodec(IndexCodec):
    name = "auto"
    codec_id = 19
    description = "smallest index codec within a false-positive budget (default 0: exact only)"

    def __init__(self, max_false_positives: float = 0.0, per_key: bool = False,
                 candidates: Sequence[str] | None = None, slack: float = 0.03) -> None:
        if max_false_positives < 0:
            raise ValueError(f"max_false_positives must be >= 0, got {max_false_positives}")
        names = list(candidates) if candidates is not None else [
            c for c in available_codecs("indices") if c != self.name]
        if self.name in names:
            raise ValueError("auto cannot be its own candidate")
        self.codecs: list[IndexCodec] = [get_codec(c, "indices") for c in names]  # type: ignore[misc]
        if not self.codecs:
            raise ValueError("auto needs at least one candidate codec")
        self.max_false_positives = float(max_false_positives)
        self.lossy = self.max_false_positives > 0  # type: ignore[misc]  (instance-level: depends on budget)
        self.per_key = per_key
        self.slack = slack

    def budget(self, k: int) -> float:
        """The allowed expected false positives for a payload of ``k`` keys."""
        return self.max_false_positives * k if self.per_key else self.max_false_positives

    def admissible(self, k: int, n: int) -> list[IndexCodec]:
        """Candidates whose expected false positives fit the budget."""
        b = self.budget(k)
        return [c for c in self.codecs if c.expected_false_positives(k, n) <= b]

    def choose(self, indices: np.ndarray, n: int, seed: int = 0) -> tuple[IndexCodec, bytes]:
        """The winning codec and its payload."""
        idx = check_indices(indices, n)
        k = idx.size
        ok = self.admissible(k, n)
        if not ok:
            raise CodecError(f"auto: no candidate codec meets a false-positive budget of {self.budget(k)}")
        est = {c.name: c.estimate_bits(k, n) for c in ok}
        best = min(est.values())
        tried = sorted((c for c in ok if est[c.name] <= best * (1 + self.slack)), key=lambda c: c.codec_id)
        results = [(len(p), c.codec_id, c, p) for c in tried for p in [c.encode(idx, n, seed)]]
        _, _, codec, payload = min(results, key=lambda r: (r[0], r[1]))
        return codec, payload

    def encode(self, indices: np.ndarray, n: int, seed: int = 0) -> bytes:
        return self.choose(indices, n, seed)[1]

    def _inner(self, data: bytes) -> IndexCodec:
        c = codec_of(data)
        if c.kind != "indices" or isinstance(c, AutoCodec):
            raise CodecError(f"auto: payload was written by {c.name!r}, not an index codec")
        return c  # type: ignore[return-value]

    def decode(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        return self._inner(data).decode(data, expect_n=expect_n)

    def decode_mask(self, data: bytes, *, expect_n: int | None = None) -> np.ndarray:
        return self._inner(data).decode_mask(data, expect_n=expect_n)

    def inspect(self, data: bytes) -> dict[str, Any]:
        return self._inner(data).inspect(data)

    def expected_false_positives(self, k: int, n: int) -> float:
        ok = self.admissible(k, n)
        best = min(ok, key=lambda c: c.estimate_bits(k, n))
        return best.expected_false_positives(k, n)

    def estimate_bits(self, k: int, n: int) -> float:
        return min(c.estimate_bits(k, n) for c in self.admissible(k, n))

"""Entropy models and the coders that code under them: the one coding layer under every entropy-coded codec.

A **model** says how likely each symbol is, and both sides know it (from the params, or from what they both
hold); a **coder** turns symbols into 32-bit words under a model, and back. They are separate types, as in
constriction: the same model is coded by more than one coder, and the codec that frames the message (its
container, its params, what the symbols mean) does not change with the coder.

Models
    :class:`Categorical`  weights over ``0..size-1`` (normalised here): an empirical histogram
                          (:meth:`Categorical.of_histogram`) or a parametric law (the ``ans`` index codec's
                          truncated geometric remainders).
    :class:`Bernoulli`    one probability of a 1 per position (FedPM's entropy-coded mask).

Coders
    :func:`ans_write` / :class:`AnsReader`  constriction's ANS stack coder, any model, several streams on one
                          stack (written in reverse, read in order); garbage and trailing words are
                          :class:`~deltamask.codecs.container.CodecError`, never constriction's own exceptions.
    :class:`EmpiricalCoder`  symbols under *their own* histogram, which travels in the params beside the
                          coder's side information: :data:`ANS_EMPIRICAL` (constriction; no side information)
                          and ``deltamask.codecs.rans.RANS4`` (our 4-lane rANS: final lane states). Used by the
                          counts, q8, delta and QSGD codecs.

Every codec's bytes are what they were before this layer existed (the golden payloads pin them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from .container import CodecError, check_decode_size

#: Symbols per block of the streaming passes: bounded temporaries (a few MB) instead of int64 copies of all N
#: (benchmarks/RESULTS.md, "server at scale").
CHUNK = 1 << 20


# --- models -------------------------------------------------------------------------------------------------

class Categorical:
    """A categorical law over ``0..size-1`` from non-negative weights (normalised to sum 1 in float64)."""

    def __init__(self, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64).ravel()
        self.probs = w / w.sum()

    @classmethod
    def of_histogram(cls, hist: np.ndarray) -> "Categorical":
        """The empirical law of symbols with these counts."""
        return cls(np.asarray(hist).astype(np.float64))

    def constriction(self) -> Any:
        import constriction

        return constriction.stream.model.Categorical(self.probs, perfect=False)


class Bernoulli:
    """Independent bits, ``probs[i]`` the probability that bit ``i`` is 1 (both sides hold the array)."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = np.asarray(probs, dtype=np.float64).ravel()

    def constriction(self) -> Any:
        import constriction

        return constriction.stream.model.Bernoulli(perfect=False)


Model = Categorical | Bernoulli


# --- constriction's ANS stack -----------------------------------------------------------------------------------

def ans_write(streams: Sequence[tuple[np.ndarray, Model]]) -> bytes:
    """The u32 little-endian words of ``streams`` (``(symbols, model)`` in the order :class:`AnsReader` reads
    them) on one ANS stack. Each stream is pushed in blocks from its last to its first: the same pushes, in
    the same order, as one ``encode_reverse`` of the whole array (identical bytes)."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, model in reversed(streams):
        sym = np.asarray(symbols).ravel()
        if sym.size == 0:
            continue
        m = model.constriction()
        for lo in range(((sym.size - 1) // CHUNK) * CHUNK, -1, -CHUNK):
            block = sym[lo : lo + CHUNK].astype(np.int32)
            if isinstance(model, Bernoulli):
                coder.encode_reverse(block, m, model.probs[lo : lo + CHUNK])
            else:
                coder.encode_reverse(block, m)
    return coder.get_compressed().astype("<u4").tobytes()


class AnsReader:
    """Reads the streams :func:`ans_write` wrote, in order; ``what`` names the codec in every error."""

    def __init__(self, payload: bytes | np.ndarray, what: str) -> None:
        self.what = what
        if isinstance(payload, (bytes, bytearray, memoryview)):
            if len(payload) % 4:
                raise CodecError(f"{what}: ANS payload length {len(payload)} is not a multiple of 4")
            words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        else:
            words = np.asarray(payload, dtype=np.uint32)
        try:
            import constriction

            self.coder = constriction.stream.stack.AnsCoder(words)
        except BaseException as e:  # noqa: BLE001 - constriction raises its own types on garbage
            raise CodecError(f"{what}: stream could not be decoded: {e}") from None

    def read(self, model: Model, count: int, start: int = 0) -> np.ndarray:
        """The next ``count`` symbols (int64); a :class:`Bernoulli` model reads its probabilities from ``start``."""
        try:
            if isinstance(model, Bernoulli):
                out = self.coder.decode(model.constriction(), model.probs[start : start + count])
            else:
                out = self.coder.decode(model.constriction(), count)
        except BaseException as e:  # noqa: BLE001 - constriction raises its own types on garbage
            raise CodecError(f"{self.what}: stream could not be decoded: {e}") from None
        return np.asarray(out, dtype=np.int64)

    def finish(self, hint: str = "the payload is corrupted") -> None:
        """Every word must have been read."""
        if not self.coder.is_empty():
            raise CodecError(f"{self.what}: ANS stream has trailing data ({hint})")


# --- symbols under their own histogram ----------------------------------------------------------------------------

def histogram(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Counts of each symbol ``0..alphabet-1`` (int64), in blocks; symbols outside raise CodecError."""
    sym = np.asarray(symbols).ravel()
    hist = np.zeros(alphabet, dtype=np.int64)
    for lo in range(0, sym.size, CHUNK):
        block = sym[lo : lo + CHUNK]
        if block.min() < 0 or block.max() >= alphabet:
            raise CodecError(f"symbols must lie in 0..{alphabet - 1}")
        hist += np.bincount(block, minlength=alphabet)
    return hist


def read_histogram(raw: bytes, alphabet: int) -> np.ndarray:
    """A histogram block (u32 x alphabet) as int64; a block of another size is a CodecError."""
    if len(raw) != 4 * alphabet:
        raise CodecError(f"histogram block has {len(raw)} bytes, expected {4 * alphabet}")
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


class EmpiricalCoder(ABC):
    """Codes symbols ``0..alphabet-1`` under their own histogram (the model), which travels in the codec's
    params as ``head | histogram (u32 x alphabet) | side``: ``head`` is the coder's constant identification,
    ``side`` what its decoder needs besides the words (:meth:`params`, :meth:`parse_params`)."""

    name: str
    #: constant bytes before the histogram (identify the coder's layout)
    head: bytes = b""
    #: bytes of side information after the histogram
    side_size: int = 0

    @abstractmethod
    def encode(self, symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes, bytes]:
        """(histogram, side information, words)."""

    @abstractmethod
    def decode(self, hist: np.ndarray, side: bytes, words: bytes, count: int, table: np.ndarray | None = None) -> np.ndarray:
        """The ``count`` symbols (int64), or ``table[symbol]`` for each (decoded and looked up block by block:
        no array of all the symbols is held); checked against ``hist``."""

    def params(self, hist: np.ndarray, side: bytes) -> bytes:
        return self.head + np.asarray(hist).astype("<u4").tobytes() + side

    def parse_params(self, raw: bytes, alphabet: int, what: str) -> tuple[np.ndarray, bytes]:
        """(histogram, side information) from the params block :meth:`params` wrote."""
        want = len(self.head) + 4 * alphabet + self.side_size
        if raw[: len(self.head)] != self.head:
            raise CodecError(f"{what}: parameter block is not {self.name}'s layout")
        if len(raw) != want:
            raise CodecError(f"{what}: parameter block has {len(raw)} bytes, expected {want}")
        hist = read_histogram(raw[len(self.head) : len(self.head) + 4 * alphabet], alphabet)
        return hist, raw[len(self.head) + 4 * alphabet :]


class AnsEmpirical(EmpiricalCoder):
    """constriction's ANS under the empirical histogram (24-bit model); a constant sequence has no words."""

    name = "ans"

    def encode(self, symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes, bytes]:
        sym = np.asarray(symbols).ravel()
        hist = histogram(sym, alphabet).astype(np.uint32)
        if sym.size == 0 or np.count_nonzero(hist) <= 1:
            return hist, b"", b""  # a constant sequence is fully described by its histogram
        return hist, b"", ans_write([(sym, Categorical.of_histogram(hist))])

    def decode(self, hist: np.ndarray, side: bytes, words: bytes, count: int, table: np.ndarray | None = None) -> np.ndarray:
        if int(hist.sum()) != count:
            raise CodecError(f"histogram sums to {int(hist.sum())}, header says {count} symbols")
        check_decode_size(count, "ANS symbols")  # a constant sequence has an empty payload: bound the count
        nz = np.flatnonzero(hist)
        out = np.empty(count, dtype=np.int64 if table is None else table.dtype)
        if count == 0:
            return out
        if nz.size == 1:
            if words:
                raise CodecError("constant sequence must have an empty payload")
            out[:] = nz[0] if table is None else table[nz[0]]
            return out
        reader = AnsReader(words, "ANS")
        model = Categorical.of_histogram(hist)
        seen = np.zeros(hist.size, dtype=np.int64)
        for lo in range(0, count, CHUNK):
            block = reader.read(model, min(CHUNK, count - lo))
            seen += np.bincount(block, minlength=hist.size)[: hist.size]
            if table is None:
                out[lo : lo + block.size] = block
            else:
                np.take(table, block, out=out[lo : lo + block.size])
        reader.finish()
        if seen.tolist() != hist.tolist():
            raise CodecError("decoded symbols do not match the histogram: the payload is corrupted")
        return out


ANS_EMPIRICAL = AnsEmpirical()


def ans_encode_symbols(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes]:
    """ANS-code ``symbols`` in ``0..alphabet-1`` under their histogram; returns (histogram, words)."""
    hist, _, words = ANS_EMPIRICAL.encode(symbols, alphabet)
    return hist, words


def ans_decode_symbols(hist: np.ndarray, payload: bytes, count: int, table: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`ans_encode_symbols` (see :meth:`EmpiricalCoder.decode`)."""
    return ANS_EMPIRICAL.decode(hist, b"", payload, count, table)


__all__ = ["ANS_EMPIRICAL", "AnsEmpirical", "AnsReader", "Bernoulli", "CHUNK", "Categorical", "EmpiricalCoder",
           "ans_decode_symbols", "ans_encode_symbols", "ans_write", "histogram", "read_histogram"]

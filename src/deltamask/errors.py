"""Errors that end a run, and the kinds of a client's own failure, kept free of heavy imports so the CLI and the
Flower ClientApp (which imports no torch) can use them cheaply."""


class RunFailed(RuntimeError):
    """The run could not do what it was asked (no node joined, too many rounds without an update).
    ``summary.json`` has ``status: failed`` and this reason; no model artifact is written."""


#: the kinds a client (or a node, over the wire) may name for its own failure (``Failure.kind``); anything
#: else it names is recorded as "error"
CLIENT_FAILURE_KINDS = ("error", "stale-cache")


def failure_kind(e: BaseException) -> str:
    """The failure kind an exception raised by a client's update names (its ``kind``: ``ClientFailure``
    subclasses, the node worker's ``WorkerError``), bounded to :data:`CLIENT_FAILURE_KINDS`."""
    kind = getattr(e, "kind", "error")
    return kind if kind in CLIENT_FAILURE_KINDS else "error"


def oversize_reason(size: int, cap: int | None) -> str | None:
    """Why a reply payload of ``size`` bytes is refused under ``cap`` (the method's ``max_reply_bytes``);
    None when it fits or no cap is known. One wording for every place that checks it."""
    if cap is None or size <= cap:
        return None
    return f"payload of {size:,} bytes, over the cap of {cap:,} (64 bits per masked scalar and head parameter, plus framing)"


#: the most characters of another party's text (a client's error, a node's refusal reason) that a run keeps
MAX_REASON_CHARS = 2000


def _printable(s: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def bounded_text(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters of the original: control characters
    (newlines, terminal escapes) are escaped as ``\\n``, ``\\xNN``, ``\\uNNNN``, so another party's text
    cannot forge a log line or drive a terminal; a longer text keeps its first and last ``limit / 2``
    characters (what failed, and the exception at the end of a traceback) and says how much was left out."""
    s = str(text)
    if len(s) <= limit:
        return _printable(s)
    half = limit // 2
    return f"{_printable(s[:half])} [... {len(s) - 2 * half:,} characters left out ...] {_printable(s[-half:])}"

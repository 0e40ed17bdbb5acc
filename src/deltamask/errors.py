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

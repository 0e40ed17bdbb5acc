"""Errors that end a run, kept free of heavy imports so the CLI can catch them cheaply."""


class RunFailed(RuntimeError):
    """The run could not do what it was asked (no node joined, too many rounds without an update).
    ``summary.json`` has ``status: failed`` and this reason; no model artifact is written."""

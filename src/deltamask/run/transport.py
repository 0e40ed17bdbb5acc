"""The contract between the round driver and an engine: a transport moves bytes, nothing more.

The driver (:mod:`deltamask.run.round`) decides who trains, builds every downlink and aggregates; a
transport only answers two questions:

* :meth:`Transport.available` -- which client ids can be reached this round;
* :meth:`Transport.exchange` -- deliver ``{client: downlink bytes}`` and return, per client, either a
  :class:`~deltamask.methods.Reply` or a typed :class:`~deltamask.methods.Failure` with its real reason.

Clients keep a small cache between rounds (last theta / head received). Where that cache lives is the
transport's business: in this process (local), or on the node (Flower). :meth:`Transport.client_states`
returns what the transport can persist with the run state, and :meth:`Transport.restore` gets it back on
resume, answering which clients still hold their cache (the driver re-sends the rest).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..methods import Failure, Reply


@dataclass
class Exchange:
    """One round's traffic as the transport saw it."""

    replies: dict[int, Reply] = field(default_factory=dict)
    failures: dict[int, Failure] = field(default_factory=dict)
    #: transport-specific record fields (e.g. Flower's own byte counts), merged into the metrics line
    fields: dict[str, Any] = field(default_factory=dict)


class Transport(ABC):
    """Moves one round's bytes between the server and the selected clients."""

    #: the most bytes a reply's payload may hold (set by the round driver from the method before
    #: :meth:`start`); a transport that receives bytes from other machines refuses a longer one before
    #: copying it, as a ``rejected`` failure. None: no limit known.
    max_reply_bytes: int | None = None

    #: the engine's name, written in ``summary.json``
    name: str = "?"

    def start(self) -> None:
        """Called once before the first round (e.g. wait for nodes); may raise :class:`RunFailed`."""

    def available(self, round_: int) -> list[int] | None:
        """Client ids reachable this round (``None``: all of them)."""
        return None

    @abstractmethod
    def exchange(self, round_: int, downlinks: dict[int, bytes]) -> Exchange:
        """Deliver each client's downlink, run its update, and collect every reply or failure.
        Every client in ``downlinks`` must end up in exactly one of ``replies`` / ``failures``."""

    def forget(self, client_id: int) -> None:
        """The client failed: its cache (if the transport holds it) is no longer trusted."""

    def client_states(self) -> dict[int, dict[str, Any]] | None:
        """Client caches to persist with the run state (``None``: they live on the nodes)."""
        return None

    def restore(self, client_states: dict[int, dict[str, Any]]) -> set[int]:
        """On resume: take back persisted client caches; returns the clients whose cache is held."""
        return set()

    def identities(self) -> dict[int, str]:
        """client id -> the identity of the party bound to serve it (e.g. ``node:17`` or ``key:<sha256>`` on
        Flower), persisted with the run state so that resume keeps every binding; {}: none (local)."""
        return {}

    def bind(self, identities: dict[int, str]) -> None:
        """On resume, before :meth:`start`: the bindings of the interrupted run (see :meth:`identities`)."""

    def close(self) -> None:
        """Release what the transport holds (called when the run ends, whatever the outcome)."""

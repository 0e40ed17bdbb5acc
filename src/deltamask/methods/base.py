"""The contract between a federated method and the engines that run it.

A method is a (client step, server step, codecs) triple. Engines (the local simulator, Flower) only
move ``bytes``: they call :meth:`Method.downlink` for each selected client, deliver the bytes, call
:meth:`Method.client_update` on the client side, deliver the reply's bytes back and call
:meth:`Method.aggregate`. Nothing else crosses the network, so bytes counted here are bytes sent.

A message is a *bundle*: one or more codec containers back to back (each container is
self-delimiting). Parts are told apart by their codec kind (``probs`` = theta, ``array`` = head, ...).

Clients keep a small cache (``ClientContext.state``): the last theta and head they received. The
server tracks which version each client holds and sends a part only when the client's copy is stale;
a client that lost its cache fails loudly and the server forgets what it believed it held.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..codecs import codec_of, get_codec
from ..codecs.bundle import join_bundle, parts_by_kind, split_bundle  # noqa: F401 - re-exported: methods frame replies with them
from ..codecs.container import CodecError
from ..config import Config
from ..errors import bounded_text
from ..model.masking import MaskedNetwork
from ..fl.aggregation import ServerState, init_state


@dataclass
class ClientData:
    """A client's local data, already through the mask-independent prefix of the backbone."""

    client_id: int
    h: Any  # prefix outputs: a tensor (cache_dtype) or prefix_cache.DiskRows; read a batch as h[idx]
    y: torch.Tensor  # labels
    #: derived, recomputable caches (e.g. pooled features under a given mask version); never sent
    cache: dict[Any, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])


@dataclass
class ClientContext:
    round: int
    client_id: int
    seed: int
    #: persistent per-client state (cached theta / head, error-feedback buffers, ...)
    state: dict[str, Any]


@dataclass
class Reply:
    client_id: int
    payload: bytes
    num_samples: int
    #: client-side training metrics and simulator-only truths (never counted as payload bits)
    metrics: dict[str, float] = field(default_factory=dict)


class ClientFailure(RuntimeError):
    """A client could not produce a valid reply (dropped from the round with this reason).

    ``kind`` is the :data:`FAILURE_KINDS` entry the transport records for it; a subclass that the round
    driver must act on (:class:`~deltamask.methods.downlink.StaleCache`) names its own kind, which crosses
    every transport beside the message, so the driver never parses a reason string."""

    kind = "error"


#: why a client's round failed (``Failure.kind``)
FAILURE_KINDS = (
    "error",  # the client's update raised (its reason is the exception)
    "timeout",  # no reply within the round timeout
    "node-lost",  # the transport reports the node gone (Flower: node unavailable)
    "transport",  # the transport could not deliver or the reply could not be unpacked
    "malformed",  # the reply arrived but its payload does not decode
    "rejected",  # the reply decoded but failed a check against what the server knows (robust.py)
    "stale-cache",  # the client's cached theta is not what the server coded against: re-sent a snapshot this round
)  # a client may name only errors.CLIENT_FAILURE_KINDS for itself


@dataclass(frozen=True)
class Failure:
    """A selected client that contributed nothing this round, and why."""

    client: int
    reason: str
    kind: str = "error"
    node: int | None = None  # the transport's node id, where there is one

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {self.kind!r}; valid: {', '.join(FAILURE_KINDS)}")
        # the reason often quotes another party (a node's error text): one printable, bounded line
        object.__setattr__(self, "reason", bounded_text(self.reason))

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.client, "reason": self.reason, "kind": self.kind}
        if self.node is not None:
            out["node"] = self.node
        return out


@dataclass(frozen=True)
class Sent:
    """One client's downlink, and what the server believes the client holds once it decodes it: the theta
    (or weight-update) version and the head version (None: the message does not change it)."""

    payload: bytes
    theta_version: int | None = None
    head_version: int | None = None


def record_sent(state: ServerState, client_id: int, sent: Sent) -> None:
    """Record in the server state the versions a client holds after ``sent`` reached it."""
    if sent.theta_version is not None:
        state.client_theta_version[client_id] = sent.theta_version
    if sent.head_version is not None:
        state.client_head_version[client_id] = sent.head_version


@dataclass
class Aggregation:
    """What :meth:`Method.aggregate` did with one round's replies."""

    phase: str  # "head", "mask", "weights", ...
    num_good: int  # replies that decoded and entered the update
    dropped: list[Failure] = field(default_factory=list)  # replies that arrived but did not decode
    skipped: bool = False  # fewer than min_replies good replies: the state was left alone
    #: per-client statistics of the good replies (bits, bpp, codec, bound_bits, ...)
    clients: list[dict[str, Any]] = field(default_factory=list)


#: bytes a reply may hold beyond 64 bits per masked scalar and head parameter: codec headers, containers, the bundle
REPLY_OVERHEAD_BYTES = 64 * 1024


class Method(ABC):
    """A federated method: what goes down, what the client computes and sends up, how the server aggregates."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: True when clients keep state the server cannot re-send (e.g. error-feedback buffers): a run
    #: whose clients lost that state cannot be resumed to the same result
    client_memory: bool = False

    def __init__(self, cfg: Config, net: MaskedNetwork) -> None:
        self.cfg = cfg
        self.net = net
        self.n = net.num_masked
        self.head_codec = get_codec(cfg.head_codec, kind="array")

    # --- server ------------------------------------------------------------------------------------
    def init_state(self) -> ServerState:
        w = self.net.head.weight.detach().cpu().numpy()
        b = self.net.head.bias.detach().cpu().numpy()
        return init_state(self.n, self.cfg.theta0, w, b, posterior_params=False)  # weight methods never read alpha/beta

    @abstractmethod
    def send(self, state: ServerState, client_id: int, round_: int) -> Sent:
        """The bytes the server sends to ``client_id`` at the start of round ``round_``, and the versions the
        client holds once it decodes them. Changes no server state: the round driver records the versions
        (:func:`record_sent`) and forgets them again when the client fails (:meth:`delivered`)."""

    def downlink(self, state: ServerState, client_id: int, round_: int) -> bytes:
        """:meth:`send`, recording what the client then holds: for callers that drive a method by hand."""
        sent = self.send(state, client_id, round_)
        record_sent(state, client_id, sent)
        return sent.payload

    @abstractmethod
    def client_update(self, downlink: bytes, data: ClientData, ctx: ClientContext) -> Reply:
        """Decode the downlink, train locally, encode the reply (client side)."""

    @abstractmethod
    def aggregate(self, state: ServerState, replies: list[Reply], round_: int) -> Aggregation:
        """Decode replies and update ``state`` in place."""

    def record_fields(self, agg: Aggregation, replies: list[Reply]) -> dict[str, Any]:
        """This method's own fields in the round's metrics line (beside the driver's generic ones), from the
        replies it accepted (a reply dropped as malformed does not count)."""
        return {}

    def resumed(self, state: ServerState) -> None:
        """Called once on a state loaded to resume a run, before any send: bring what the method keeps in the
        state up to date (the default: nothing)."""

    def delivered(self, state: ServerState, client_id: int, ok: bool) -> None:
        """Called after a client's round: on failure the server forgets what it believed the client held."""
        if not ok:
            state.client_head_version.pop(client_id, None)
            state.client_theta_version.pop(client_id, None)
            for key in [k for k in state.extra if k.startswith(f"client{client_id}:")]:
                del state.extra[key]

    def eval_mask(self, state: ServerState) -> torch.Tensor | None:
        """The deterministic mask the global model is evaluated with (None: unmasked)."""
        return None

    def prepare_eval(self, state: ServerState) -> None:
        """Put the global model's trained (non-mask) parameters into the network before evaluation
        (weight-training baselines); mask methods have none."""

    def global_delta(self, state: ServerState) -> np.ndarray | None:
        """The trained additive change of the N masked weights, for the model artifact (None: none)."""
        return None

    def uses_masks(self) -> bool:
        return False

    def max_reply_bytes(self) -> int:
        """The most bytes a reply of this method may hold; a longer one is refused before it is copied or
        decoded (issue 22). Derived from N and the head: 64 bits for every masked scalar and every head
        parameter (no built-in uplink codec sends more: an index codec coding every one of the N positions
        takes at most 2.5 bytes each (fuse16), float32 takes 4, top-k at ratio 1 an index and a value), plus
        :data:`REPLY_OVERHEAD_BYTES` for headers and framing. A plug-in method sending more overrides it."""
        c, d = self.net.head.weight.shape
        return 8 * (self.n + c * (d + 1)) + REPLY_OVERHEAD_BYTES

    # --- head helpers ------------------------------------------------------------------------------
    def encode_head(self, weight: np.ndarray, bias: np.ndarray) -> bytes:
        return self.head_codec.encode(np.concatenate([weight, bias[:, None]], axis=1))

    def decode_head(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        c, d1 = self.net.head.weight.shape[0], self.net.head.weight.shape[1] + 1
        codec = codec_of(data)
        if codec.name != self.head_codec.name:
            raise CodecError(f"head payload written by {codec.name}, this run sends the head as {self.head_codec.name}")
        arr = codec.decode(data, expect_n=c * d1)
        if arr.shape != (c, d1):
            raise CodecError(f"head payload has shape {arr.shape}, expected {(c, d1)}")
        return arr[:, :-1].copy(), arr[:, -1].copy()

    def head_downlink_part(self, state: ServerState, client_id: int) -> list[bytes]:
        """The head, if this client's cached copy is stale (after it the client holds ``state.head_version``)."""
        if state.client_head_version.get(client_id, -1) == state.head_version:
            return []
        return [self.encode_head(state.head_weight, state.head_bias)]

    def client_head(self, parts: dict[str, bytes], ctx: ClientContext) -> tuple[np.ndarray, np.ndarray]:
        if "array" in parts:
            w, b = self.decode_head(parts["array"])
            ctx.state["head_weight"], ctx.state["head_bias"] = w, b
        if "head_weight" not in ctx.state:
            raise ClientFailure("no head received and none cached (client state lost?)")
        return ctx.state["head_weight"], ctx.state["head_bias"]

"""Run state on disk: written atomically after every round, read back by ``--resume``.

One safetensors file (never pickle) holds the server state's arrays, every client's cached arrays
and, in its metadata, a JSON document with the scalars (round, versions, client scalars) and the
resolved config. Writing goes to a temporary file in the same folder, fsync, then ``os.replace``,
so a crash leaves either the old or the new state, never half of one. A SHA-256 of the arrays in the
metadata catches damage that safetensors' own header and size checks do not (a flipped data byte).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .files import save_atomic

from ..fl.aggregation import (
    ServerState,
    theta_versions_from_arrays,
    theta_versions_to_arrays,
)

STATE_FILE = "state.safetensors"
#: 2: alpha/beta are optional (absent when the priors reset every round) and counts use the narrowest
#: unsigned dtype; version-1 files (alpha/beta always present, int32 counts) are still read.
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


class StateError(Exception):
    """The state file is missing, corrupted or from another run; the message says what to do."""


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name). safetensors checks
    the header and the file size but not the data, so a flipped bit in an array would load silently."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_state(
    directory: str | Path,
    state: ServerState,
    client_states: dict[int, dict[str, Any]],
    config: dict[str, Any],
    engine: str = "local",
) -> Path:
    from safetensors.numpy import save_file

    d = Path(directory)
    tensors: dict[str, np.ndarray] = {
        "server/theta": state.theta,
        "server/head_weight": state.head_weight,
        "server/head_bias": state.head_bias,
    }
    if state.alpha is not None and state.beta is not None:
        tensors["server/alpha"] = state.alpha
        tensors["server/beta"] = state.beta
    if state.counts is not None:
        tensors["server/counts"] = state.counts
    for k, v in {**state.extra, **theta_versions_to_arrays(state.theta_versions)}.items():
        tensors[f"extra/{k}"] = v
    client_scalars: dict[str, dict[str, Any]] = {}
    for cid, cst in client_states.items():
        sc: dict[str, Any] = {}
        for k, v in cst.items():
            if isinstance(v, np.ndarray):
                tensors[f"client/{cid}/{k}"] = v
            else:
                sc[k] = v
        client_scalars[str(cid)] = sc
    meta = {
        "state_version": STATE_VERSION,
        "round": state.round,
        "head_version": state.head_version,
        "theta_version": state.theta_version,
        "counts_total": state.counts_total,
        "client_head_version": {str(k): v for k, v in state.client_head_version.items()},
        "client_theta_version": {str(k): v for k, v in state.client_theta_version.items()},
        "client_scalars": client_scalars,
        "identities": {str(k): v for k, v in state.identities.items()},
        "config": config,
        "engine": engine,
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta["sha256"] = tensor_digest(tensors)
    return save_atomic(d / STATE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"deltamask": json.dumps(meta, default=_json_default)}))


def load_state(directory: str | Path) -> tuple[ServerState, dict[int, dict[str, Any]], dict[str, Any], str]:
    """(server state, client states, saved config, engine that wrote it) from ``directory``;
    raises :class:`StateError`."""
    from safetensors import safe_open

    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise StateError(
            f"no run state at {str(path)!r}: nothing to resume; start the run without --resume (with --overwrite "
            "if the folder holds a run that stopped before its first round ended)"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get("deltamask")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        if meta_raw is None:
            raise ValueError("no deltamask metadata")
        meta = json.loads(meta_raw)
        if "sha256" in meta and meta["sha256"] != tensor_digest(tensors):
            raise ValueError("its arrays do not match their checksum")
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
        raise StateError(
            f"run state {str(path)!r} is corrupted or not a deltamask state ({type(e).__name__}: {e}); "
            "delete the output folder and start again, or restore the file"
        ) from None
    if meta.get("state_version") not in READABLE_VERSIONS:
        raise StateError(f"run state {str(path)!r} has version {meta.get('state_version')}, this build reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        versions, extra = theta_versions_from_arrays({k[6:]: v for k, v in tensors.items() if k.startswith("extra/")})
        state = ServerState(
            round=int(meta["round"]),
            theta=tensors["server/theta"],
            alpha=tensors.get("server/alpha"),
            beta=tensors.get("server/beta"),
            head_weight=tensors["server/head_weight"],
            head_bias=tensors["server/head_bias"],
            head_version=int(meta["head_version"]),
            client_head_version={int(k): int(v) for k, v in meta["client_head_version"].items()},
            theta_version=int(meta["theta_version"]),
            client_theta_version={int(k): int(v) for k, v in meta["client_theta_version"].items()},
            counts=tensors.get("server/counts"),
            counts_total=int(meta["counts_total"]),
            extra=extra,
            theta_versions=versions,
            identities={int(k): str(v) for k, v in meta.get("identities", {}).items()},
        )
        clients: dict[int, dict[str, Any]] = {int(c): dict(sc) for c, sc in meta["client_scalars"].items()}
        for k, v in tensors.items():
            if k.startswith("client/"):
                _, cid, key = k.split("/", 2)
                clients.setdefault(int(cid), {})[key] = v
    except (KeyError, ValueError, TypeError) as e:
        raise StateError(f"run state {str(path)!r} is incomplete ({e}); delete the output folder and start again") from None
    return state, clients, meta["config"], str(meta.get("engine", "local"))


def server_arrays(state: ServerState) -> dict[str, Any]:
    """The server state's arrays by name (``alpha`` / ``beta`` None where not kept), ``extra/`` ones
    included: what the finiteness checks read."""
    arrays: dict[str, Any] = {k: getattr(state, k) for k in ("theta", "head_weight", "head_bias", "alpha", "beta")}
    arrays.update({f"extra/{k}": v for k, v in state.extra.items()})
    return arrays


def check_loaded_state(state: ServerState, clients: dict[int, dict[str, Any]], ref: ServerState, num_clients: int,
                       directory: str | Path) -> None:
    """A resumed state must be one this run could have written: every server array of the shape a fresh
    state of the run's config has (``ref``, the method's round-0 state), every float array finite, every
    client id in ``[0, num_clients)``. Raises :class:`StateError` with one line naming the first problem."""
    from ..fl.robust import nonfinite_fields

    path = Path(directory) / STATE_FILE
    fix = "delete the output folder and start again, or restore the file"

    def shape_of(name: str, got: Any, want: tuple[int, ...]) -> None:
        shape = None if got is None else tuple(np.shape(got))
        if shape != want:
            raise StateError(f"run state {str(path)!r}: {name} has shape {shape}, this run's config gives {want}; {fix}")

    n = tuple(np.shape(ref.theta))
    server_shapes = {k: tuple(np.shape(getattr(ref, k))) for k in ("theta", "head_weight", "head_bias")}
    for name, want in server_shapes.items():
        shape_of(f"server/{name}", getattr(state, name), want)
    for name in ("alpha", "beta", "counts"):  # kept only where the method reads them: N entries where present
        if getattr(state, name) is not None or getattr(ref, name) is not None:
            shape_of(f"server/{name}", getattr(state, name), n)
    for k, want in ref.extra.items():
        shape_of(f"extra/{k}", state.extra.get(k), tuple(np.shape(want)))
    for v, tv in state.theta_versions.items():
        if tv.levels is not None:
            shape_of(f"the theta history's levels of version {v}", tv.levels[2], n)
    for cid, cst in clients.items():
        for k, v in cst.items():
            if k in server_shapes and isinstance(v, np.ndarray):
                shape_of(f"client/{cid}/{k}", v, server_shapes[k])
    bad_ids = sorted(c for c in set(clients) | set(state.client_theta_version) | set(state.client_head_version)
                     | set(state.identities) if not 0 <= c < num_clients)
    if bad_ids:
        raise StateError(f"run state {str(path)!r} names clients {bad_ids[:5]}, outside 0..{num_clients - 1}; {fix}")
    arrays: dict[str, Any] = {k if k.startswith("extra/") else f"server/{k}": v for k, v in server_arrays(state).items()}
    arrays.update({f"extra/{k}": v for k, v in theta_versions_to_arrays(state.theta_versions).items()})
    for cid, cst in clients.items():
        arrays.update({f"client/{cid}/{k}": v for k, v in cst.items() if isinstance(v, np.ndarray)})
    bad = nonfinite_fields(arrays)
    if bad:
        raise StateError(f"run state {str(path)!r} holds non-finite values ({', '.join(bad[:5])}); {fix}")

"""deltamask on Flower (flwr >= 1.42, Message API): a ServerApp that runs the core's round driver over a
Flower transport (which only packs, sends, collects and unpacks codec bytes) and a ClientApp. The only
package that imports flwr.

    from deltamask.engines.flower import make_server_app, make_client_app
    # flwr run: serverapp = "deltamask.engines.flower.server_app:app"
    #           clientapp = "deltamask.engines.flower.client_app:app"

Names are loaded on first use: the deployment ClientApp process imports ``client_app`` on every
message and must not pay for the server side (or torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "make_client_app": ".client_app",
    "make_server_app": ".server_app",
    "run_server": ".server_app",
    "FLOWER_KEYS": ".settings",
    "FlowerSettings": ".settings",
    "resolve": ".settings",
    "FlowerTransport": ".transport",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)

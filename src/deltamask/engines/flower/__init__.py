"""deltamask on Flower (flwr >= 1.42, Message API): a ServerApp that runs the core's round driver over a
Flower transport (which only packs, sends, collects and unpacks codec bytes) and a ClientApp. The only
package that imports flwr.

    from deltamask.engines.flower import make_server_app, make_client_app
    # flwr run: serverapp = "deltamask.engines.flower.server_app:app"
    #           clientapp = "deltamask.engines.flower.client_app:app"
"""

from __future__ import annotations

from .client_app import make_client_app
from .server_app import make_server_app, run_server
from .settings import FLOWER_KEYS, FlowerSettings, resolve
from .transport import FlowerTransport

__all__ = ["FLOWER_KEYS", "FlowerTransport", "FlowerSettings", "make_client_app", "make_server_app", "resolve", "run_server"]

"""deltamask on Flower (flwr >= 1.42, Message API): ServerApp, ClientApp and a Strategy that only
packs, sends, collects and unpacks the core's codec bytes. The only package that imports flwr.

    from deltamask.engines.flower import make_server_app, make_client_app
    # flwr run: serverapp = "deltamask.engines.flower.server_app:app"
    #           clientapp = "deltamask.engines.flower.client_app:app"
"""

from __future__ import annotations

from .client_app import make_client_app
from .server_app import make_server_app, run_server
from .settings import FLOWER_KEYS, FlowerSettings, resolve
from .strategy import DeltaMaskStrategy

__all__ = ["FLOWER_KEYS", "DeltaMaskStrategy", "FlowerSettings", "make_client_app", "make_server_app", "resolve", "run_server"]

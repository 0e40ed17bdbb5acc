"""Shared fixtures: a tiny, fast experiment (timm's test_efficientnet, random init, sklearn digits)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch loads MKL: see deltamask/__init__.py
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/dmtest.py, for every test folder
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from deltamask.config import Config  # noqa: E402
from dmtest import tiny_config  # noqa: E402

@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _node_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Flower clients keep a per-node disk cache; in tests it lives in a temporary folder, not ~/.cache."""
    os.environ["DELTAMASK_NODE_CACHE"] = str(tmp_path_factory.mktemp("node-cache"))


@pytest.fixture(autouse=True, scope="session")
def _flower_out_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Flower run writes only below the server-side output root ($DELTAMASK_OUT_ROOT); the tests' run
    folders are pytest's temporary folders, so the root is their common base."""
    os.environ["DELTAMASK_OUT_ROOT"] = str(tmp_path_factory.getbasetemp())

"""docs/architecture.md's worked examples run, and do what the page says (one test per extension point)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "extend"


def _example(name: str):  # type: ignore[no-untyped-def]
    """Import examples/extend/NAME.py once (it registers its plug-in on import)."""
    mod = sys.modules.get(f"dm_example_{name}")
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"dm_example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = mod  # type: ignore[union-attr]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_the_page_names_every_example_and_every_example_is_on_the_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    for f in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/extend/{f.name}" in page, f.name


def test_add_a_model_family(tmp_path) -> None:
    ex = _example("add_model_family")
    from deltamask.model.backbones import family_of, load_model

    assert family_of("tinycnn:16") == (ex.TINYCNN, "16")
    loaded = load_model("tinycnn:16", image_size=32)
    assert loaded.backbone.block_indices and len(loaded.backbone.block_indices) == 4  # the 4 members of features
    summary = ex.main(str(tmp_path / "run"))
    assert summary["status"] == "completed"
    assert summary["num_masked_params"] == 2 * 16 * 16 * 3 * 3  # the last 2 blocks' conv kernels, nothing else

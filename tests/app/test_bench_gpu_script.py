"""benchmarks/bench_gpu.py stays runnable without a GPU: its CPU smoke mode, and a clean refusal of cuda."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_run_writes_every_figure(tmp_path) -> None:
    out = tmp_path / "r.json"
    assert _bench().main(["--device", "cpu", "--model", "timm:test_vit", "--image-size", "160", "--batch", "4", "--steps", "1",
                          "--repeats", "1", "--blocks", "1", "--filter-n", "100000", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    t = res["train"]
    assert t["num_masked"] > 0 and t["num_trainable_dense"] >= t["num_masked"]  # dense trains the same blocks (+ biases, norms)
    assert {"masked", "dense", "delta"} <= set(t) and t["masked_over_dense"] > 0
    assert res["filter"]["keys"] == 400 and res["filter"]["fuse8"]["bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_card_is_a_clear_refusal(capsys) -> None:
    assert _bench().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err

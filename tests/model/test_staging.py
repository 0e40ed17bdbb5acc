"""Generic staging over a matrix of zoo architectures (random init, offline), and ``weights=`` per form.

Each architecture is checked against the model's *own* forward, computed here independently of the
staging code: timm ``forward_head(forward_features(x), pre_logits=True)``; torchvision the input of the
final ``nn.Linear`` of an untouched copy of the model (a pre-hook on the classifier given below);
transformers ViT / DINOv2 the CLS token of ``last_hidden_state``, CLIP ``pooler_output``. The last two
blocks are written out by hand from each architecture's definition, so ``masked_blocks=L`` is checked
against names, not against the code's own idea of a block.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from deltamask.config import build_config
from deltamask.engines.local import run_local
from deltamask.model.backbones import ModelError, load_model, select_masked

SIZE = 64  # reduced from the zoo models' 224
HF_SIZE = 48  # the tiny transformers configs are made for 32 px: 48 needs interpolated position embeddings

# spec -> (classifier path in the untouched model (torchvision) or None, the last two blocks' module names)
ARCHS: dict[str, tuple[str | None, tuple[str, str]]] = {
    "timm:resnet18": (None, ("layer4.0", "layer4.1")),
    "timm:efficientnet_b0": (None, ("blocks.5.3", "blocks.6.0")),
    "timm:mobilenetv3_small_100": (None, ("blocks.4.2", "blocks.5.0")),
    "timm:convnext_atto": (None, ("stages.3.blocks.0", "stages.3.blocks.1")),
    "timm:regnetx_002": (None, ("s4.b6", "s4.b7")),
    "timm:vit_tiny_patch16_224": (None, ("blocks.10", "blocks.11")),
    "timm:deit_tiny_patch16_224": (None, ("blocks.10", "blocks.11")),
    "timm:swin_tiny_patch4_window7_224": (None, ("layers.3.blocks.0", "layers.3.blocks.1")),
    "torchvision:resnet18": ("fc", ("layer4.0", "layer4.1")),
    "torchvision:mobilenet_v2": ("classifier.1", ("features.17", "features.18")),
    "torchvision:mobilenet_v3_small": ("classifier.3", ("features.11", "features.12")),
    "torchvision:efficientnet_b0": ("classifier.1", ("features.7.0", "features.8")),
    "torchvision:convnext_tiny": ("classifier.2", ("features.7.1", "features.7.2")),
    "torchvision:regnet_x_400mf": ("fc", ("trunk_output.block4.block4-10", "trunk_output.block4.block4-11")),
    "torchvision:vit_b_16": ("heads.head", ("encoder.layers.encoder_layer_10", "encoder.layers.encoder_layer_11")),
    "torchvision:swin_t": ("head", ("features.7.0", "features.7.1")),
    "hf:vit": (None, ("layers.1", "layers.2")),
    "hf:dinov2": (None, ("encoder.layer.1", "encoder.layer.2")),
    "hf:clip": (None, ("encoder.layers.1", "encoder.layers.2")),
}
# A 1-round run costs 8-26 s per architecture on the shared 2-core CPU machine, so the default suite runs
# one per framework (plus the two that crashed before generic staging) and the rest are `slow`; the
# allclose and block checks above run for every architecture by default, and scripts/test.sh (CI) runs
# every 1-round run as its own step (`pytest -m slow tests/model/test_staging.py`).
FAST_RUNS = {"timm:resnet18", "timm:vit_tiny_patch16_224", "torchvision:mobilenet_v2", "torchvision:resnet18", "hf:dinov2"}
SLOW_RUNS = {a for a in ARCHS if a not in FAST_RUNS}


def _hf_configs() -> dict:
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
    return {
        "vit": transformers.ViTConfig(intermediate_size=64, **small),
        "dinov2": transformers.Dinov2Config(mlp_ratio=2, **small),
        "clip": transformers.CLIPVisionConfig(intermediate_size=64, **small),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, cfg in _hf_configs().items():
        torch.manual_seed(1)
        transformers.AutoModel.from_config(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


def _real_spec(spec: str, hf_dirs: dict[str, Path]) -> str:
    return f"hf:{hf_dirs[spec[3:]]}" if spec.startswith("hf:") else spec


def _size(spec: str) -> int:
    return HF_SIZE if spec.startswith("hf:") else SIZE


@functools.lru_cache(maxsize=None)
def _loaded(spec: str):  # noqa: ANN202 - one build per architecture for the whole module
    torch.manual_seed(0)
    return load_model(spec, "random", image_size=_size(spec))


def _own_features(spec: str, lm, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    root = lm.backbone.root
    if spec.startswith("timm:"):
        return root.forward_head(root.forward_features(x), pre_logits=True)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        kw = {"image_size": SIZE} if name.startswith("vit_") else {}
        fresh = torchvision.models.get_model(name, weights=None, **kw).eval()
        missing, unexpected = fresh.load_state_dict(root.state_dict(), strict=False)
        classifier = ARCHS[spec][0]
        assert not unexpected and {k.rsplit(".", 1)[0] for k in missing} == {classifier}, (missing, unexpected)
        seen: list[torch.Tensor] = []
        fresh.get_submodule(classifier).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        fresh(x)
        return seen[0]
    kind = spec[3:]
    kw = {"interpolate_pos_encoding": True} if kind in ("vit", "clip") else {}
    out = root(pixel_values=x, **kw)
    return out.pooler_output if kind == "clip" else out.last_hidden_state[:, 0]


@pytest.mark.parametrize("spec", list(ARCHS))
def test_staged_features_equal_the_models_own_pre_logits(spec: str, hf_dirs: dict[str, Path]) -> None:
    real = _real_spec(spec, hf_dirs)
    lm = _loaded(real)
    bb = lm.backbone
    assert not bb.staging_error and len(bb.block_indices) >= 3
    x = torch.randn(2, 3, _size(spec), _size(spec), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _own_features(spec, lm, x)
        assert bb.feature_dim == ref.shape[-1]
        torch.testing.assert_close(bb(x), ref)
        # a split point: the prefix (cached by the engine) is one tensor per image
        mid = bb.block_indices[len(bb.block_indices) // 2]
        h = bb(x, 0, mid)
        assert isinstance(h, torch.Tensor) and h.shape[0] == 2
        torch.testing.assert_close(bb(h, mid, None), ref)


@pytest.mark.parametrize("spec", list(ARCHS))
def test_masked_blocks_selects_exactly_the_last_blocks(spec: str, hf_dirs: dict[str, Path]) -> None:
    lm = _loaded(_real_spec(spec, hf_dirs))
    named = dict(lm.backbone.root.named_parameters())
    last_two = ARCHS[spec][1]
    for L in (1, 2):
        want = {n for n, p in named.items() if p.ndim >= 2 and n.startswith(tuple(b + "." for b in last_two[-L:]))}
        assert want and set(select_masked(lm.backbone, L)) == want


def _run_cfg(spec: str, **kw: object):  # noqa: ANN202
    return build_config(dict(
        model=spec, weights="random", dataset="digits", image_size=_size(spec), rounds=1, head_warmup_rounds=0,
        num_clients=2, clients_per_round=2, train_samples=40, test_samples=20, masked_blocks=2, batch_size=20,
        min_partition_size=5, head_epochs=1, progress=False, **kw,
    ))


@pytest.mark.parametrize(
    "spec", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_RUNS else s for s in ARCHS]
)
def test_one_round_on_digits(spec: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    s = run_local(_run_cfg(_real_spec(spec, hf_dirs)), tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1] and recs[0]["phase"] == "mask"
    assert s["num_masked_params"] > 0 and 0.0 <= s["final_accuracy"] <= 1.0


def test_vit_at_its_own_size_and_sizes_it_cannot_take() -> None:
    torch.manual_seed(0)
    assert load_model("timm:vit_tiny_patch16_224", "random", image_size=224).backbone.feature_dim == 192
    with pytest.raises(ModelError, match=r"takes image_size=224 only"):  # fixed position embeddings
        load_model("torchvision:vit_b_16", "", pretrained_online=True, image_size=64)
    with pytest.raises(ModelError, match=r"does not run at image_size=70.*set image_size=224"):  # not whole patches
        load_model("timm:vit_tiny_patch16_224", "random", image_size=70)


def test_unstageable_model_says_to_use_mask_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose blocks cannot be found still loads as one stage; masked_blocks says what to do,
    and mask_pattern works (the whole model recomputed, no prefix cache)."""
    import deltamask.model.backbones as models
    from deltamask.model.masking import MaskedNetwork

    monkeypatch.setattr(models, "_timm_units", lambda model: [])
    torch.manual_seed(0)
    lm = load_model("timm:test_resnet", "random", image_size=32)
    assert lm.backbone.block_indices == []
    with pytest.raises(ModelError, match="mask_pattern=REGEX.*prefix cache"):
        select_masked(lm.backbone, 2)
    net = MaskedNetwork(lm, 3, mask_pattern=r"layer4")
    x = torch.randn(2, 3, 32, 32)
    assert net.first_masked_stage == 0 and torch.equal(net.prefix(x), x)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), lm.backbone.root.forward_head(lm.backbone.root.forward_features(x), pre_logits=True))
    # a run says so: no silent loss of the prefix cache
    from deltamask.run.experiment import build_experiment

    said: list[str] = []
    build_experiment(_run_cfg("timm:test_resnet", mask_pattern="layer4"), status=said.append)
    assert any("could not be cut into blocks (no block container found): no prefix cache" in m for m in said), said


def test_self_check_catches_a_wrong_composition(monkeypatch: pytest.MonkeyPatch) -> None:
    """If any stage computed something else (here: every block's output off by 1%), the load-time
    self-check falls back to one opaque stage instead of computing other features than the model's."""
    import deltamask.model.backbones as models

    real = models._BlockCall.forward
    monkeypatch.setattr(models._BlockCall, "forward", lambda self, x: real(self, x) * 1.01)
    torch.manual_seed(0)
    lm = load_model("timm:test_resnet", "random", image_size=32)
    assert lm.backbone.block_indices == [] and "do not reproduce" in lm.backbone.staging_error


# --- weights= means what it says ------------------------------------------------------------------

def _params(lm) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in lm.backbone.root.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_random_is_not_the_imagenet_weights() -> None:
    torch.manual_seed(0)
    pre = _params(load_model("efficientnet_lite0", image_size=32))
    torch.manual_seed(0)
    rnd = _params(load_model("efficientnet_lite0", "random", image_size=32))
    torch.manual_seed(0)
    assert _same(rnd, _params(load_model("efficientnet_lite0", "random", image_size=32)))
    assert rnd.keys() == pre.keys() and not torch.equal(rnd["conv_stem.weight"], pre["conv_stem.weight"])


@pytest.mark.parametrize("spec", ["timm:test_resnet", "torchvision:resnet18"])
def test_random_and_checkpoint_weights(spec: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    if spec.startswith("timm:"):
        import timm

        full = timm.create_model(spec[5:], pretrained=False)
    else:
        import torchvision

        full = torchvision.models.get_model(spec.split(":")[1], weights=None)
    sd = full.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    from_file = _params(load_model(spec, str(tmp_path / "w.pth"), image_size=32))
    assert all(torch.equal(v, sd[k]) for k, v in from_file.items())
    torch.manual_seed(0)
    rnd = _params(load_model(spec, "random", image_size=32))
    assert not any(torch.equal(rnd[k], from_file[k]) for k in rnd if rnd[k].ndim >= 2)
    # a checkpoint whose keys do not match is an error naming the keys, never a partial load
    extra = {**sd, "extra_head.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match=r"unexpected keys extra_head\.weight.*weights="):
        load_model(spec, str(tmp_path / "extra.pth"), image_size=32)
    key = next(k for k in sd if k.endswith("conv1.weight"))
    torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=rf"missing keys {key}"):
        load_model(spec, str(tmp_path / "missing.pth"), image_size=32)
    cls = [k for k in sd if k.startswith(("fc.", "head.", "classifier."))]
    torch.save({k: v for k, v in sd.items() if k not in cls}, tmp_path / "nohead.pth")
    with pytest.raises(ModelError, match="missing keys"):  # classifier included: loaded strictly, then dropped
        load_model(spec, str(tmp_path / "nohead.pth"), image_size=32)


def test_hf_random_builds_from_the_config_only(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = hf_dirs["vit"]
    saved = _params(load_model(f"hf:{d}", image_size=32))
    assert _same(saved, _params(load_model(f"hf:{d}", str(d), image_size=32)))  # weights=DIR as before
    torch.manual_seed(0)
    rnd = _params(load_model(f"hf:{d}", "random", image_size=32))
    torch.manual_seed(0)
    fresh = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(d))
    assert _same(rnd, {k: v for k, v in fresh.named_parameters()})
    mats = [k for k in rnd if rnd[k].ndim >= 2]
    assert mats and not any(torch.equal(rnd[k], saved[k]) for k in mats)
    # a directory with a tensor the architecture does not have: an error naming it
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    transformers.AutoModel.from_config(_hf_configs()["vit"]).save_pretrained(bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["encoder.extra_layer.weight"] = torch.zeros(2, 2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"extra_layer"):
        load_model(f"hf:{bad}", str(bad), image_size=32)


def test_cli_mismatched_weights_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deltamask.app.cli import main
    from dmtest import TINY

    import timm

    sd = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    torch.save({**sd, "bogus.weight": torch.zeros(1)}, tmp_path / "w.pth")
    argv = ["run", "--out", str(tmp_path / "out")]
    for k, v in {**TINY, "weights": str(tmp_path / "w.pth")}.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bogus.weight" in err and "weights=" in err

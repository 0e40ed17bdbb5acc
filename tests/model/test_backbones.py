"""Backbones by spec: the built-in pretrained weights are real, adapters cut models into stages."""

import numpy as np
import pytest
import torch

from deltamask.model.masking import MaskedNetwork
from deltamask.model.backbones import ModelError, load_model


def test_builtin_efficientnet_lite0_has_real_imagenet_weights() -> None:
    skdata = pytest.importorskip("skimage.data")
    lm = load_model("efficientnet_lite0")
    img = torch.tensor(skdata.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(lm.mean)[:, None, None]) / torch.tensor(lm.std)[:, None, None]
    import timm

    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    from deltamask.model.backbones import efficientnet_lite0_weights_path, load_efficientnet_lite0_into

    load_efficientnet_lite0_into(ref, efficientnet_lite0_weights_path())
    with torch.no_grad():
        probs = ref(x).softmax(-1)[0]
        feats = lm.backbone(x)
    assert int(probs.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(probs.max()) > 0.5
    # our staged backbone computes exactly the reference's pre-logit features
    with torch.no_grad():
        ref_feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, ref_feats)
    assert lm.num_backbone_params == 3_371_008


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "timm:test_vit", "timm:test_resnet", "torchvision:resnet18"])
def test_staged_backbone_matches_the_models_own_forward(spec: str) -> None:
    torch.manual_seed(0)
    lm = load_model(spec, "random")
    x = torch.randn(2, 3, 64, 64)
    root = lm.backbone.root
    with torch.no_grad():
        staged = lm.backbone(x)
        if spec.startswith("timm:"):
            ref = root.forward_head(root.forward_features(x), pre_logits=True)
        else:
            ref = root(x)  # fc replaced by Identity
    torch.testing.assert_close(staged, ref)
    assert len(lm.backbone.block_indices) >= 2
    net = MaskedNetwork(lm, 5, masked_blocks=1)
    assert net.num_masked > 0 and net.first_masked_stage == lm.backbone.block_indices[-1]


def test_torchvision_local_weights_file(tmp_path) -> None:
    import torchvision

    m = torchvision.models.resnet18()
    torch.save(m.state_dict(), tmp_path / "r18.pth")
    lm = load_model("torchvision:resnet18", str(tmp_path / "r18.pth"))
    torch.testing.assert_close(dict(lm.backbone.root.named_parameters())["conv1.weight"], m.conv1.weight)


def test_hf_local_directories(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfgs = {
        "vit": transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8),
        "dinov2": transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8),
        "clip": transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8),
    }
    for name, cfg in cfgs.items():
        model = transformers.AutoModel.from_config(cfg)
        model.save_pretrained(tmp_path / name)
        lm = load_model(f"hf:{tmp_path / name}")
        net = MaskedNetwork(lm, 4, masked_blocks=2)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out = net(x)
            model.eval()
            res = model(pixel_values=x)
            ref, pooled = res.last_hidden_state, res.pooler_output
            feats = lm.backbone(x)
        assert out.shape == (2, 4)
        if name == "clip":  # CLIP's pooler output is post_layernorm(CLS)
            torch.testing.assert_close(feats, pooled)
        else:  # ViT / DINOv2: last_hidden_state is already layer-normed; features are its CLS token
            torch.testing.assert_close(feats, ref[:, 0])
        assert net.num_masked > 0


@pytest.mark.parametrize(
    "spec, weights, needle",
    [
        ("resnet50", "", "unknown model spec"),
        ("timm:no_such_model_xyz", "random", "timm has no model"),
        ("torchvision:no_such_model", "random", "torchvision has no model"),
        ("efficientnet_lite0", "/nonexistent/w.pth", "does not exist"),
    ],
)
def test_model_errors(spec: str, weights: str, needle: str) -> None:
    with pytest.raises(ModelError, match=needle):
        load_model(spec, weights)


def test_bad_weights_file(tmp_path) -> None:
    p = tmp_path / "bad.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not be read"):
        load_model("efficientnet_lite0", str(p))
    np.save(tmp_path / "x.npy", np.zeros(3))


# --- the model-family registry --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, family, arg", [
    ("efficientnet_lite0", "efficientnet_lite0", "efficientnet_lite0"),
    ("builtin:efficientnet_lite0", "efficientnet_lite0", "builtin:efficientnet_lite0"),
    ("dinov2_small", "dinov2_small", "dinov2_small"),
    ("timm:vit_small_patch14_dinov2", "timm", "vit_small_patch14_dinov2"),
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("hf:facebook/dinov2-small", "hf", "facebook/dinov2-small"),
])
def test_every_spec_form_finds_its_family(spec: str, family: str, arg: str) -> None:
    from deltamask.model.backbones import family_of

    f, a = family_of(spec)
    assert (f.name, a) == (family, arg)


def test_an_unknown_spec_lists_every_registered_form_and_a_clash_is_refused() -> None:
    from deltamask.model.backbones import ModelError, ModelFamily, family_of, model_forms, register_model_family, stage_timm

    with pytest.raises(ModelError) as e:
        family_of("zoo:resnet")
    assert all(form in str(e.value) for form in model_forms()) and len(model_forms()) >= 5
    with pytest.raises(ValueError, match="clashes"):
        register_model_family(ModelFamily("mytimm", "x", lambda *a: None, stage_timm, prefix="timm:"))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="clashes"):
        register_model_family(ModelFamily("mine", "x", lambda *a: None, stage_timm, names=("dinov2_small",)))  # type: ignore[arg-type,return-value]


def test_masked_blocks_without_any_weight_matrix_is_a_clear_error() -> None:
    """torchvision's mnasnet ends in two weightless units (a BatchNorm and a ReLU): masking only those used to
    crash in MaskedNetwork with a bare ``min() arg is an empty sequence``."""
    from deltamask.model.backbones import ModelError, load_model, select_masked

    lm = load_model("torchvision:mnasnet0_5", "random", image_size=32)
    with pytest.raises(ModelError, match="hold no weight matrix.*raise masked_blocks"):
        select_masked(lm.backbone, 2)
    assert select_masked(lm.backbone, 3)  # one more block reaches a conv kernel

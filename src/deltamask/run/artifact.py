"""The fine-tuned model as a file: backbone spec + 1-bit mask + head (safetensors, never pickle).

The artifact holds no backbone weights: it names the backbone (spec and weights path, as in the
run's config) and stores the deterministic mask ``[theta >= 0.5]`` bit-packed, the head, the class
names and the preprocessing; weight-training baselines add ``weights.delta`` (float32[N], the trained
change of the masked weights). A SHA-256 of the arrays in the metadata catches a damaged file.
:func:`load_artifact` rebuilds the network; :func:`predict` classifies
new images. CLI: ``deltamask predict --model OUT/model.safetensors IMAGE...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import save_atomic
from .state import tensor_digest

ARTIFACT_VERSION = 1


class ArtifactError(Exception):
    """The artifact is missing or damaged."""


@dataclass
class FineTunedModel:
    net: Any  # MaskedNetwork with its fixed mask applied
    mask: torch.Tensor | None
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for uint8 images [n, h, w, 3] (or [n, h, w] grayscale)."""
        from ..data import preprocess

        x = np.asarray(images)
        if x.ndim == 3:
            x = np.repeat(x[..., None], 3, axis=-1)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [n, h, w, 3] or [n, h, w] uint8, got shape {x.shape}")
        dev = self.net.scores.device
        self.net.eval()
        self.net.use_fixed_mask(self.mask)
        logits = self.net(preprocess(x, self.image_size, self.mean, self.std).to(dev))
        self.net.use_fixed_mask(None)
        return torch.softmax(logits, dim=1).cpu().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)


def save_artifact(path: str | Path, exp: Any, state: Any) -> Path:
    from safetensors.numpy import save_file

    cfg = exp.cfg
    mask = exp.method.eval_mask(state)
    tensors = {
        "head.weight": state.head_weight.astype(np.float32),
        "head.bias": state.head_bias.astype(np.float32),
    }
    if mask is not None:
        tensors["mask.packed"] = np.packbits(mask.numpy().astype(bool), bitorder="little")
    delta = exp.method.global_delta(state)  # weight-training baselines: the trained change of the masked weights
    if delta is not None:
        tensors["weights.delta"] = np.asarray(delta, np.float32)
    meta = {
        "artifact_version": ARTIFACT_VERSION,
        "model": cfg.model,
        "weights": cfg.weights,
        "masked_blocks": cfg.masked_blocks,
        "mask_pattern": cfg.mask_pattern,
        "num_masked": exp.net.num_masked,
        "classes": exp.dataset.classes,
        "image_size": exp.image_size,
        "mean": list(exp.net.loaded.mean),
        "std": list(exp.net.loaded.std),
        "method": cfg.method,
        "rounds": state.round,
        "seed": cfg.seed,
    }
    meta["sha256"] = tensor_digest(tensors)
    return save_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"deltamask_artifact": json.dumps(meta)}))


def load_artifact(path: str | Path, device: str = "cpu", weights: str | None = None) -> FineTunedModel:
    """Rebuild the fine-tuned network from an artifact (the backbone is loaded from its spec)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"model artifact {str(p)!r} does not exist (a finished run writes OUT/model.safetensors)")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["deltamask_artifact"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "sha256" in meta and meta["sha256"] != tensor_digest(tensors):
            raise ValueError("its arrays do not match their checksum")
        missing = [k for k in ("head.weight", "head.bias") if k not in tensors]
        missing += [k for k in ("model", "weights", "masked_blocks", "mask_pattern", "num_masked", "classes", "image_size", "mean", "std") if k not in meta]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(
            f"model artifact {str(p)!r} is damaged or not a deltamask model ({type(e).__name__}: {e}); if the run's "
            f"state.safetensors is beside it, `deltamask run --resume {str(p.parent)}` writes the artifact again, else re-run"
        ) from None
    w = tensors["head.weight"]
    net = rebuild_network(meta, w.shape[0], weights, ArtifactError, "the artifact")
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(w))
        net.head.bias.copy_(torch.from_numpy(tensors["head.bias"]))
    mask = None
    if "mask.packed" in tensors:
        mask = torch.from_numpy(np.unpackbits(tensors["mask.packed"], bitorder="little", count=net.num_masked).astype(bool))
    net = net.to(device)
    if "weights.delta" in tensors:
        net.use_weight_delta(torch.from_numpy(tensors["weights.delta"]).to(device))
    return FineTunedModel(net, mask, list(meta["classes"]), int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))  # type: ignore[arg-type]


def rebuild_network(meta: dict[str, Any], num_classes: int, weights: str | None, error: type[Exception], what: str,
                    why: str = "") -> Any:
    """The ``MaskedNetwork`` a saved model's metadata names (spec, weights, image size, masked blocks / pattern), its
    backbone loaded from the spec (``weights`` overrides the saved path; ``random`` is rebuilt from the run's seed);
    ``error`` when it masks another number of weights than ``meta['num_masked']`` (``what`` names the file)."""
    from ..model.backbones import load_model
    from ..model.masking import MaskedNetwork

    backbone_weights = weights if weights is not None else meta["weights"]
    if backbone_weights == "random":  # a randomly initialised backbone is rebuilt from the run's seed
        torch.manual_seed(int(meta.get("seed", 0)))
    loaded = load_model(meta["model"], backbone_weights, pretrained_online=True, image_size=int(meta["image_size"]))
    net = MaskedNetwork(loaded, num_classes, meta["masked_blocks"], meta["mask_pattern"])
    if net.num_masked != meta["num_masked"]:
        raise error(f"backbone {meta['model']} masks {net.num_masked} weights here, {what} {meta['num_masked']}{why}")
    return net

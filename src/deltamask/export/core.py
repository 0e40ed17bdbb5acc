"""What every export format shares: the finished run, the network with its final mask baked into the
weights, the verification batch, the output folder and the model card.

An export is written into a temporary folder beside the target, loaded back the way a user would load it
and compared with deltamask's own model on a batch of the run's test images; only then is it moved into
place. A mismatch, or any error on the way, leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMATS = ("hf", "timm", "torchvision", "onnx", "mask")
#: the file naming a folder as a deltamask export (only such a folder is replaced by --overwrite)
MANIFEST = "export.json"
#: images of the run's test set each export is checked on
VERIFY_IMAGES = 32


class ExportError(Exception):
    """The run cannot be exported in this format, or the export does not reproduce the model."""


def install_hint(what: str) -> str:
    return f"{what} is not installed: pip install 'deltamask[export]'"


@dataclass
class Run:
    """A finished run folder: its artifact's metadata, config and summary."""

    folder: Path
    artifact: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def has_delta(self) -> bool:
        return bool(self.meta.get("_has_delta"))

    @property
    def family(self) -> tuple[str, str]:
        """(model family name, its argument) of the run's backbone spec."""
        from ..model.backbones import ModelError, family_of

        try:
            fam, arg = family_of(self.meta["model"])
        except ModelError as e:
            raise ExportError(f"{e} (a plug-in's model family: pass the same --plugin as the run)") from None
        return fam.name, arg


def open_run(folder: str | Path) -> Run:
    """The run in ``folder``; a missing folder, a failed or unfinished run is an :class:`ExportError`."""
    from safetensors import safe_open

    d = Path(folder)
    if not d.is_dir():
        raise ExportError(f"run folder {str(d)!r} does not exist; pass the --out folder of a finished `deltamask run`")
    summary = _read_json(d / "summary.json")
    art = d / "model.safetensors"
    if not art.is_file():
        if summary.get("status") == "failed":
            raise ExportError(
                f"the run in {str(d)!r} failed ({summary.get('failure', 'see its summary.json')}) and wrote no model.safetensors: "
                "there is nothing to export; fix the cause and run it again"
            )
        raise ExportError(
            f"{str(d)!r} holds no model.safetensors: not a finished deltamask run (an interrupted run: "
            f"`deltamask run --resume {d}` finishes it)"
        )
    try:
        with safe_open(str(art), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["deltamask_artifact"])
            meta["_has_delta"] = "weights.delta" in f.keys()
            meta["_has_mask"] = "mask.packed" in f.keys()
    except Exception as e:  # noqa: BLE001 - any reader failure: the file is damaged
        raise ExportError(f"{str(art)!r} is damaged or not a deltamask model ({type(e).__name__}: {e})") from None
    config = _read_json(d / "config.json") or {k: meta[k] for k in ("model", "weights", "seed") if k in meta}
    return Run(d, art, meta, config, summary)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        out = json.loads(p.read_text())
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def reference_model(run: Run) -> Any:
    """deltamask's own model (``load_artifact``) with its final mask: what every export must reproduce."""
    from ..run.artifact import ArtifactError, load_artifact

    try:
        ft = load_artifact(run.artifact)
    except ArtifactError as e:
        raise ExportError(str(e)) from None
    ft.net.eval()
    ft.net.use_fixed_mask(ft.mask)
    return ft


def bake(ft: Any) -> Any:
    """Turn ``ft``'s masked weights, in place, into plain tensors ``(W + dW) * m`` (the final mask, and a weight
    baseline's delta, applied once): the zoo model underneath (``net.backbone.root``) then has its own parameter
    names and no deltamask parametrization. Returns ``ft``."""
    from torch.nn.utils import parametrize

    net = ft.net
    net.use_fixed_mask(ft.mask)
    root = net.backbone.root
    with torch.no_grad():
        for name in net.masked_names:
            mod_name, _, attr = name.rpartition(".")
            module = root.get_submodule(mod_name) if mod_name else root
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    net.use_fixed_mask(None)
    net.use_weight_delta(None)
    net.eval()
    return ft


def root_state_dict(ft: Any) -> dict[str, torch.Tensor]:
    """The zoo model's own state dict after :func:`baked_model` (contiguous copies, safetensors-ready)."""
    sd = ft.net.backbone.root.state_dict()
    bad = [k for k in sd if "parametrizations." in k]
    if bad:
        raise ExportError(f"internal: weights still parametrized after baking the mask: {bad[:3]}")
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@dataclass
class Batch:
    images: np.ndarray  # uint8 [n, h, w, 3]
    pixels: torch.Tensor  # float32 [n, 3, s, s], preprocessed as deltamask does
    source: str


def verification_batch(run: Run, ft: Any, n: int = VERIFY_IMAGES) -> Batch:
    """The first ``n`` images of the run's test set (its data spec, seed and test_samples from config.json),
    preprocessed as deltamask does. Where the data set cannot be loaded any more, seeded random images, said so."""
    from ..data import load_dataset, preprocess, subsample

    cfg = run.config
    try:
        ds = load_dataset(str(cfg["dataset"]), seed=int(cfg.get("seed", 0)), data_dir=cfg.get("data_dir") or None, stream=True)
        ds = subsample(ds, None, int(cfg.get("test_samples") or 0) or None, int(cfg.get("seed", 0)))
        x = np.asarray(ds.x_test[: min(n, len(ds.x_test))])
        if x.ndim == 3:
            x = np.repeat(x[..., None], 3, axis=-1)
        source = f"the first {len(x)} test images of {cfg['dataset']}"
    except Exception as e:  # noqa: BLE001 - the data set is gone or unreadable: still verify, on random images
        x = np.random.default_rng(0).integers(0, 256, (n, ft.image_size, ft.image_size, 3), dtype=np.uint8)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        source = f"{n} seeded random images (the run's data set {cfg.get('dataset')!r} could not be loaded: {why})"
    return Batch(x, preprocess(x, ft.image_size, ft.mean, ft.std), source)


@torch.no_grad()
def reference_logits(ft: Any, batch: Batch) -> np.ndarray:
    return ft.net(batch.pixels).float().numpy()


@dataclass
class Check:
    rtol: float
    atol: float
    max_abs_diff: float = 0.0
    loaded_with: str = ""


def compare(got: np.ndarray, want: np.ndarray, check: Check, what: str) -> Check:
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        raise ExportError(f"the exported {what} gives logits of shape {got.shape}, deltamask's model {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    check.max_abs_diff = diff
    if not np.allclose(got, want, rtol=check.rtol, atol=check.atol):
        raise ExportError(
            f"the exported {what} does not reproduce deltamask's model: max |logit difference| {diff:.3g} "
            f"exceeds rtol={check.rtol:g}, atol={check.atol:g}; nothing was written (please report this)"
        )
    return check


@dataclass
class Written:
    """What a format writer produced (inside the temporary folder)."""

    files: list[str]
    load_snippet: str  # copy-paste Python that loads it (run from the export folder)
    check: Check
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # format-specific numbers for the card and manifest


@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[str]
    max_abs_diff: float
    rtol: float
    atol: float
    facts: dict[str, Any]
    tracked: dict[str, str] = field(default_factory=dict)  # tracker -> where the export was logged (a tracked run)


def _is_export(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder.is_dir() and not any(folder.iterdir()))


def prepare_out(run: Run, fmt: str, out: str | Path | None, overwrite: bool) -> Path:
    target = Path(out) if out else run.folder / f"export-{fmt}"
    if target.exists():
        if not overwrite:
            raise ExportError(f"{str(target)!r} already exists; pass --overwrite to replace it, or --out DIR for another folder")
        if not target.is_dir() or not _is_export(target):
            raise ExportError(f"{str(target)!r} exists and is not a deltamask export (no {MANIFEST}); --overwrite replaces only exports: pass another --out")
    if target.resolve() == run.folder.resolve():
        raise ExportError("--out must not be the run folder itself; pass a new folder")
    return target


def write_export(target: Path, write: Callable[[Path], Written], card: Callable[[Written], str], manifest: dict[str, Any]) -> Written:
    """Run ``write`` into a temporary folder beside ``target``; on success the card and manifest are added
    and the folder replaces ``target``; on any failure the temporary folder is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        w = write(tmp)
        (tmp / "README.md").write_text(card(w))
        man = {**manifest, "files": sorted([*w.files, "README.md"]), "rtol": w.check.rtol, "atol": w.check.atol,
               "max_abs_diff": w.check.max_abs_diff, "verified_with": w.check.loaded_with, **w.facts}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return w
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

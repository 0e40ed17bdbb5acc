"""Model preprocessing: uint8 images to the normalized float tensors a backbone takes."""

from __future__ import annotations

import numpy as np
import torch

from .sources import DataError, _to_rgb

__all__ = ["preprocess"]


def preprocess(
    x: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    batch: int = 1024,
) -> torch.Tensor:
    """uint8 images [n,h,w,3] -> normalized float32 [n,3,size,size] for the model.

    Resizes with bilinear interpolation (antialias=True) to a square ``size``, one
    batch at a time so peak extra memory is bounded by ``batch`` images; the output
    tensor itself is ``n*3*size*size*4`` bytes.
    """
    if x.dtype != np.uint8:
        raise DataError(f"preprocess expects uint8 images, got {x.dtype}")
    x = _to_rgb(x, "preprocess") if x.ndim == 3 or (x.ndim == 4 and x.shape[-1] != 3) else x
    if x.ndim != 4:
        raise DataError(f"preprocess expects [n, h, w, 3] images, got shape {tuple(x.shape)}")
    if size < 1 or batch < 1:
        raise DataError(f"size and batch must be >= 1, got size={size}, batch={batch}")
    n, h, w, _ = x.shape
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for start in range(0, n, batch):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))
        t = chunk.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        if (h, w) != (size, size):
            t = torch.nn.functional.interpolate(
                t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        out[start:start + len(chunk)] = (t - mean_t) / std_t
    return out

"""A fuse filter's fingerprint array as a lossless grayscale PNG (DeltaMask's "grayscale image").

The fingerprints (8- or 16-bit) are laid out row-major in a near-square image of width
``ceil(sqrt(L))`` and height ``ceil(L / width)`` (``L`` = array length), zero-padded at the end,
and saved as an 8-bit (``L``) or 16-bit (``I;16``) grayscale PNG. The filter header travels
alongside in a PNG ``tEXt`` chunk with keyword ``deltamask`` and the value::

    deltamask-fuse/1 codec=<id> n=<n> count=<k> params=<hex of the 24-byte filter params>

so :func:`png_to_payload` rebuilds the byte-identical container. Fingerprints are near-uniform
random bytes, so PNG cannot shrink them: expect the PNG a little *larger* than the raw container
(:func:`png_report` gives both sizes; METHOD.md).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from .base import codec_of
from .container import CodecError, pack, unpack
from .fuse import PARAMS, FuseCodec

TEXT_KEY = "deltamask"
_HEADER_RE = re.compile(r"^deltamask-fuse/1 codec=(\d+) n=(\d+) count=(\d+) params=([0-9a-f]+)$")


def image_shape(length: int) -> tuple[int, int]:
    """(height, width) of the near-square image holding ``length`` fingerprints."""
    if length <= 0:
        return (0, 0)
    w = math.isqrt(length - 1) + 1  # ceil(sqrt(length))
    return (-(-length // w), w)


def _filter_codec(data: bytes) -> FuseCodec:
    codec = codec_of(data)
    if not isinstance(codec, FuseCodec):
        raise CodecError(f"only fuse filter payloads have an image; this one was written by {codec.name!r}")
    return codec


def payload_to_image(data: bytes) -> tuple[np.ndarray, str]:
    """The fingerprint image (2-D uint8 or uint16) and the header line that goes with it."""
    codec = _filter_codec(data)
    f, n, k = codec.filter_of(data)
    c = unpack(data)
    h, w = image_shape(f.layout.array_length)
    img = np.zeros(h * w, dtype=f.fingerprints.dtype)
    img[: f.fingerprints.size] = f.fingerprints
    header = f"deltamask-fuse/1 codec={codec.codec_id} n={n} count={k} params={c.params.hex()}"
    return img.reshape(h, w), header


def payload_to_png(data: bytes, compress_level: int = 9) -> bytes:
    """Encode a fuse filter payload as a grayscale PNG (header in a tEXt chunk)."""
    from PIL import Image, PngImagePlugin

    img, header = payload_to_image(data)
    if img.size == 0:
        raise CodecError("a filter with an empty fingerprint array has no image")
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, header)
    im = Image.fromarray(img, mode="L") if img.dtype == np.uint8 else Image.fromarray(img.astype("<u2"))
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def image_to_payload(img: np.ndarray, header: str) -> bytes:
    """Rebuild the filter container from its image and header line (inverse of :func:`payload_to_image`)."""
    m = _HEADER_RE.match(header.strip())
    if m is None:
        raise CodecError(f"not a deltamask filter image header: {header[:80]!r}")
    codec_id, n, count, params_hex = int(m[1]), int(m[2]), int(m[3]), m[4]
    params = bytes.fromhex(params_hex)
    if len(params) != PARAMS.size:
        raise CodecError(f"image header carries {len(params)} parameter bytes, expected {PARAMS.size}")
    _, sl, sc, al, arity, bits, _ = PARAMS.unpack(params)
    if bits not in (8, 16):
        raise CodecError(f"image header says {bits}-bit fingerprints; only 8 and 16 exist")
    a = np.asarray(img)
    if a.ndim != 2 or a.shape != image_shape(al):
        raise CodecError(f"image of shape {a.shape} does not hold an array of {al} fingerprints "
                         f"(expected {image_shape(al)})")
    flat = a.ravel()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise CodecError(f"image pixel values exceed {bits} bits")
    if np.any(flat[al:]):
        raise CodecError("image padding after the fingerprint array is not zero")
    fps = flat[:al].astype(f"<u{bits // 8}").tobytes()
    data = pack(codec_id, n, count, fps, params)
    _filter_codec(data).filter_of(data)  # validate everything else (sizes, arity, codec id)
    return data


def png_to_payload(png: bytes) -> bytes:
    """Decode a PNG written by :func:`payload_to_png` back to the identical filter container."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(png))
        im.load()
    except Exception as e:  # Pillow raises many types on garbage
        raise CodecError(f"not a readable PNG: {e}") from None
    header = im.info.get(TEXT_KEY) if hasattr(im, "info") else None
    if not isinstance(header, str):
        raise CodecError(f"PNG has no {TEXT_KEY!r} text chunk: not a deltamask filter image")
    return image_to_payload(np.asarray(im), header)


def png_report(data: bytes) -> dict[str, Any]:
    """Sizes of the raw container vs its PNG (bytes and bits per key)."""
    png = payload_to_png(data)
    k = unpack(data).count
    return {
        "raw_bytes": len(data),
        "png_bytes": len(png),
        "png_over_raw": len(png) / len(data),
        "raw_bits_per_key": 8 * len(data) / k if k else None,
        "png_bits_per_key": 8 * len(png) / k if k else None,
    }

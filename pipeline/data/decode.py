"""Image decoding inside Ray Data tasks: bytes or a URI -> uint8 (S, S) grayscale, failures
marked per row (never raised), then the model-ready float rows and tokens.

High bit depths are scaled by the range of their mode, never by an image's own maximum (which
would brighten a dark image to gray): 16-bit integers ("I;16*", and "I", Pillow's 32-bit integer
mode, read as 16-bit data clipped to 0..65535) map 0..65535 to 0..255 (v / 257, rounded); floats
("F") map 0.0..1.0 to 0..255 (clipped, NaN as 0), the usual range of float images. Files and
pixel counts above the limits (pipeline/data/paths.py) are refused before decoding.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.images import to_float
from pipeline.data.paths import ReadFailure, ReadLimits, read_image_bytes
from pipeline.data.sources import tokenizer_from_json

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# ---------------------------------------------------------------- images


def to_model_gray(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size) grayscale: composite transparency on white, scale
    16-bit and float by their mode's range (module docstring), resize the shorter side to `size`,
    center-crop the longer one."""
    if img.getexif().get(0x0112, 1) != 1:  # a camera's EXIF orientation: turn the pixels upright
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)  # 4 bytes a pixel, in place below
        arr *= 255
        arr += 32767
        arr //= 65535  # round(v / 257): v / 257 is never exactly halfway
        img = Image.fromarray(arr.astype(np.uint8))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        img = Image.fromarray(np.rint(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8))
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "L":
        img = img.convert("L")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


def _decode_one(data: object, uri: str | None, size: int, limits: ReadLimits) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, skip reason)."""
    try:
        if data is None:
            data = read_image_bytes(uri or "", limits.max_image_bytes)
    except ReadFailure as e:
        return None, e.reason
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, "unreadable_image"
    if len(data) > limits.max_image_bytes:
        return None, "too_large"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.width * img.height > limits.max_image_pixels:
                    return None, "too_large"  # refused before a pixel is decoded
                img.load()  # decodes fully: a truncated file fails here, not later
                return to_model_gray(img, size), ""
    except Image.DecompressionBombError:  # Pillow's own limit, above 179 Mpx
        return None, "too_large"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError):
        return None, "unreadable_image"


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, limits: ReadLimits | None = None
) -> dict[str, np.ndarray]:
    """Ray map_batches: read and decode each row's image; failures become a skip reason."""
    limits = limits or ReadLimits()
    n = len(batch["file_name"])
    images = np.zeros((n, image_size, image_size), dtype=np.uint8)
    skip = np.asarray(batch["skip"], dtype=object).copy()
    for i in range(n):
        if skip[i] not in ("", "truncated"):
            continue
        img, reason = _decode_one(batch["image_bytes"][i], batch["image_uri"][i], image_size, limits)
        if img is None:
            skip[i] = reason
        else:
            images[i] = img
    return {
        "file_name": batch["file_name"],
        "caption": batch["caption"],
        "attributes": batch["attributes"],
        "skip": skip.astype(str),
        "image": images,
    }


def finalize_batch(
    batch: dict[str, np.ndarray], tokenizer_json: str | None, max_len: int
) -> dict[str, np.ndarray]:
    """Ray map_batches: drop bad rows (and the later rows of a duplicated file name, marked by
    ingest's `duplicate` column), scale images to [-1, 1], add tokens."""
    keep = np.isin(batch["skip"], ["", "truncated"])
    if "duplicate" in batch:
        keep &= ~np.asarray(batch["duplicate"], dtype=bool)
    out = {
        "image": to_float(batch["image"][keep]).numpy(),  # (B, S, S) in [-1, 1]
        "caption": batch["caption"][keep],
        "file_name": batch["file_name"][keep],
        "attributes": batch["attributes"][keep],
    }
    if tokenizer_json is not None:
        out["tokens"] = tokenizer_from_json(tokenizer_json).encode(list(out["caption"]), max_len).numpy()  # (B, T)
    return out



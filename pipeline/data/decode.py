"""Image decoding inside Ray Data tasks: bytes or a URI -> uint8 (S, S) grayscale, failures
marked per row (never raised), then the model-ready float rows and tokens."""

from __future__ import annotations

import io
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.images import to_float
from pipeline import storage
from pipeline.data.sources import tokenizer_from_json

# ---------------------------------------------------------------- images


def to_model_gray(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size) grayscale: composite transparency on white, scale
    16/32-bit to 8 bits, resize the shorter side to `size`, center-crop the longer one."""
    if img.getexif().get(0x0112, 1) != 1:  # a camera's EXIF orientation: turn the pixels upright
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit full range -> 8-bit
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "L":
        img = img.convert("L")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


def _read_image_bytes(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)  # raises FileNotFoundError for a missing file
    with fs.open_input_stream(path) as f:
        return f.read()


def _decode_one(data: bytes | None, uri: str | None, size: int) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, reason)."""
    try:
        if data is None:
            data = _read_image_bytes(uri or "")
    except FileNotFoundError:
        return None, "missing_file"
    except OSError:
        return None, "unreadable_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            return to_model_gray(img, size), ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "unreadable_image"


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray map_batches: read and decode each row's image; failures become a skip reason."""
    n = len(batch["file_name"])
    images = np.zeros((n, image_size, image_size), dtype=np.uint8)
    skip = np.asarray(batch["skip"], dtype=object).copy()
    for i in range(n):
        if skip[i] not in ("", "truncated"):
            continue
        img, reason = _decode_one(batch["image_bytes"][i], batch["image_uri"][i], image_size)
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
    """Ray map_batches: drop bad rows, scale images to [-1, 1], add tokens."""
    keep = np.isin(batch["skip"], ["", "truncated"])
    out = {
        "image": to_float(batch["image"][keep]).numpy(),  # (B, S, S) in [-1, 1]
        "caption": batch["caption"][keep],
        "file_name": batch["file_name"][keep],
        "attributes": batch["attributes"][keep],
    }
    if tokenizer_json is not None:
        out["tokens"] = tokenizer_from_json(tokenizer_json).encode(list(out["caption"]), max_len).numpy()  # (B, T)
    return out



"""The one image conversion and the one PNG encoder of the project.

Images travel as uint8 (B, S, S) grayscale, ink dark on light paper: what `model.sampling`
returns, what Ray Data ingestion keeps in the object store and what the probes read. The model
works on float in [-1, 1] (paper = +1, ink = -1). Every stage converts with these two functions,
so real and generated images are rounded the same way.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# PIL's default zlib level, written out: a changed level changes every image's sha256 in the manifests.
PNG_COMPRESS_LEVEL = 6


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """float in [-1, 1] (any shape) -> uint8 of the same shape, rounded to nearest (ties to even,
    the same in numpy and torch)."""
    if isinstance(images, np.ndarray):
        return np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (any shape) -> float32 in [-1, 1], on the input's device (numpy -> CPU)."""
    x = torch.from_numpy(np.array(images, copy=True)) if isinstance(images, np.ndarray) else images
    return x.float() / 127.5 - 1.0


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """A PNG file of an (H, W) uint8 grayscale array (or any PIL image)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()

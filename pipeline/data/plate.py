"""The engraving plate: a canvas twice the target size, ink textures fixed in plate coordinates,
and the drawing primitives (fill a mask with a texture, outline, engrave along an edge, stroke).

Why: a small generative model must reproduce every tone as sharp hatching, so every tone is a
texture fixed in plate coordinates (precomputed per size and cached, never a random phase or
angle per image). Masks are drawn with PIL on a canvas SS times the target size, textures pasted
through them, then the canvas is box-downsampled for anti-aliasing. Scenes: pipeline/data/scenes.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

MIN_SIZE, MAX_SIZE = 64, 512
PAPER = 240  # paper tone (uint8); a fixed grain of a few levels is added on top
INK = 28  # ink tone: near black, as printed ink is never pure black on paper
SS = 2  # supersampling factor of the drawing canvas

Point = tuple[float, float]
Shape = tuple[str, Sequence]  # ("poly", points) | ("ellipse", (x0, y0, x1, y1)) | ("rect", bbox)



def check_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE} px, got {size!r}")


def line_unit(size: int) -> int:
    """Canvas pixels per line width at a target size: one output pixel at 64 px, 1.5 at 128 px,
    then growing with the square root of the size so large plates keep fine line work."""
    f = 1 + (size - 64) / 128 if size <= 128 else 1.5 * math.sqrt(size / 128)
    return max(SS, round(SS * f))


# ---------------------------------------------------------------- textures (cached per size)

# name -> line sets (angle of the lines in degrees, 0 = horizontal; spacing in line units).
_LINE_TEXTURES: dict[str, tuple[tuple[float, float], ...]] = {
    "light": ((45, 4),),
    "medium": ((-45, 3),),
    "dark": ((45, 3), (-45, 3)),
    "vertical": ((90, 3),),
    "horizontal": ((0, 4),),
    "dusk": ((0, 3),),
    "night": ((45, 2), (-45, 2)),
    "paving": ((0, 4), (90, 6)),
}


@functools.lru_cache(maxsize=64)
def _texture(size: int, name: str) -> Image.Image:
    """A full-canvas ink texture ("L", 255 = ink), fixed in plate coordinates."""
    n, u = size * SS, line_unit(size)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    ink = np.zeros((n, n), dtype=bool)
    if name == "stipple":
        # A fixed dot pattern on a grid of line units, one dot per cell at most.
        cells = -(-n // u)
        dots = np.random.default_rng(7).random((cells, cells)) < 0.3
        ink = np.kron(dots, np.ones((u, u), dtype=bool))[:n, :n]
    elif name == "waves":
        phase = y + 0.8 * u * np.sin(2 * np.pi * x / (9 * u))
        ink = (phase % (3 * u)) < u
    else:
        for angle, spacing in _LINE_TEXTURES[name]:
            a = math.radians(angle)
            phase = y * math.cos(a) - x * math.sin(a)
            ink |= (phase % (spacing * u)) < u
    return Image.fromarray(np.where(ink, 255, 0).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _paper(size: int) -> np.ndarray:
    """Paper tone with a fixed faint grain, float32 (size, size)."""
    grain = np.random.default_rng(11).normal(0.0, 2.5, (size, size))
    return (PAPER + grain).astype(np.float32)


# ---------------------------------------------------------------- the plate being drawn


class Plate:
    """Drawing state of one image: an ink canvas ("L", 255 = ink) SS times the target size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.n = size * SS
        self.u = line_unit(size)
        self.ink = Image.new("L", (self.n, self.n), 0)
        self.draw = ImageDraw.Draw(self.ink)

    def px(self, pts: Sequence[Point]) -> list[Point]:
        return [(x * self.n, y * self.n) for x, y in pts]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        n = self.n
        return [min(x0, x1) * n, min(y0, y1) * n, max(x0, x1) * n, max(y0, y1) * n]

    def mask(self, shapes: Sequence[Shape], minus: Sequence[Shape] = ()) -> Image.Image:
        m = Image.new("L", (self.n, self.n), 0)
        d = ImageDraw.Draw(m)
        for shapes_, value in ((shapes, 255), (minus, 0)):
            for kind, geom in shapes_:
                self._shape(d, kind, geom, fill=value)
        return m

    def _shape(self, d: ImageDraw.ImageDraw, kind: str, geom: Sequence, **kw) -> None:
        if kind == "poly":
            d.polygon(self.px(geom), **kw)
        elif kind == "ellipse":
            d.ellipse(self.box(*geom), **kw)
        else:
            d.rectangle(self.box(*geom), **kw)

    def fill(self, mask: Image.Image, texture: str | None) -> None:
        """Replace the ink under `mask` with a texture (None: clear to paper)."""
        box = mask.getbbox()  # pasting only the mask's bounding box is several times faster
        if box is None:
            return
        m = mask.crop(box)
        if texture is None:
            self.ink.paste(0, box, m)
        else:
            self.ink.paste(_texture(self.size, texture).crop(box), box, m)

    def outline(self, shapes: Sequence[Shape], weight: float = 1.5) -> None:
        """Ink the outlines of shapes; weight is in line units, 0 draws none."""
        if weight <= 0:
            return
        w = max(SS, round(weight * self.u))
        for kind, geom in shapes:
            self._shape(self.draw, kind, geom, outline=255, width=w)

    def edge(self, mask: Image.Image, weight: float = 1.5) -> None:
        """Ink a band just outside a mask: the outline of a union of shapes."""
        w = max(1, round(weight * self.u))
        box = mask.getbbox()
        if box is None:
            return
        x0, y0 = max(0, box[0] - w), max(0, box[1] - w)
        x1, y1 = min(self.n, box[2] + w), min(self.n, box[3] + w)
        a = np.asarray(mask.crop((x0, y0, x1, y1))) > 0
        grown = a.copy()  # dilation by a (2w+1) square, one axis at a time
        for axis in (0, 1):
            src = grown.copy()
            for k in range(1, w + 1):
                if axis == 0:
                    grown[k:] |= src[:-k]
                    grown[:-k] |= src[k:]
                else:
                    grown[:, k:] |= src[:, :-k]
                    grown[:, :-k] |= src[:, k:]
        band = Image.fromarray((grown & ~a).astype(np.uint8) * 255)
        self.ink.paste(255, (x0, y0, x1, y1), band)

    def engrave(
        self,
        shapes: Sequence[Shape],
        light: str | None,
        dark: str | None = None,
        split: float | None = None,
        minus: Sequence[Shape] = (),
        weight: float = 1.5,
    ) -> None:
        """Clear shapes to paper, hatch them with `light`, the part right of x=`split` (the side
        away from the light) with `dark`, and outline them."""
        m = self.mask(shapes, minus)
        self.fill(m, light)  # pasting a texture replaces what was under the mask
        if dark:
            shade = m.copy()
            if split is not None:
                ImageDraw.Draw(shade).rectangle([0, 0, split * self.n, self.n], fill=0)
            self.fill(shade, dark)
        self.outline([*shapes, *minus], weight)

    def stroke(self, pts: Sequence[Point], weight: float = 1.5) -> None:
        self.draw.line(self.px(pts), fill=255, width=max(SS, round(weight * self.u)), joint="curve")

    def to_array(self) -> np.ndarray:
        cover = np.asarray(self.ink.reduce(SS), dtype=np.float32) / 255.0
        paper = _paper(self.size)
        return np.rint(paper - cover * (paper - INK)).astype(np.uint8)



"""The scenes of the procedural engravings: subjects, settings, sky, birds, on one plate.

Scene layout (plate coordinates in [0, 1], y down): the horizon sits near y=0.6; the setting
fills the ground below it (sea: wave lines; hills: two hatched rolling hills; field: furrows
converging to the horizon under a stippled hedge; town: a row of roofs over a paved ground);
the subject stands in the foreground at x = 0.28 / 0.5 / 0.72 (position); the sky element
sits high on the side away from the subject; birds are bold "v" shapes at fixed slots at
the top centre; the time of day sets the sky hatching (day: none, dusk: horizontal lines,
night: dense cross-hatching). Shapes are large and distinct at 64 px, and random jitter is only
a few percent of the plate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
from PIL import ImageChops, ImageDraw

from pipeline.data.grammar import ATTRIBUTES, is_valid_scene
from pipeline.data.plate import Plate, Point, Shape, check_size

# Subject x centre per position; the sky element goes to the far side of the plate.
POSITION_X = {"left": 0.3, "center": 0.5, "right": 0.7}
SKY_X = {"left": 0.81, "center": 0.81, "right": 0.19}
BIRD_SLOTS: tuple[Point, ...] = ((0.5, 0.09), (0.385, 0.16), (0.615, 0.16))
STAR_SLOTS: tuple[Point, ...] = (
    (0.12, 0.12), (0.3, 0.07), (0.24, 0.3), (0.44, 0.25), (0.7, 0.08),
    (0.88, 0.14), (0.6, 0.33), (0.83, 0.38), (0.1, 0.44), (0.92, 0.5), (0.36, 0.42),
)  # fmt: skip



def _tx(cx: float, base: float, s: float) -> Callable[[Sequence[Point]], list[Point]]:
    """Maps subject-local coordinates (origin at the foot, y up negative) onto the plate."""
    return lambda pts: [(cx + x * s, base + y * s) for x, y in pts]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _arch(x: float, r: float, spring: float, foot: float) -> list[Point]:
    """An arch opening: a half circle of radius r springing at y=spring, sides down to y=foot."""
    half = [(x + r * math.cos(a), spring - r * math.sin(a)) for a in np.linspace(0, math.pi, 13)]
    return [(x + r, foot), *half, (x - r, foot)]


def _disk(x: float, y: float, r: float) -> Shape:
    return ("ellipse", (x - r, y - r, x + r, y + r))


# ---------------------------------------------------------------- subjects


def _ship(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    hull = ("poly", t([(-0.2, -0.07), (0.2, -0.07), (0.14, 0.02), (-0.15, 0.02)]))
    for m, top in ((-0.07, -0.44), (0.08, -0.37)):
        p.stroke(t([(m, -0.07), (m, top)]), 1.2)
        sails = [
            (
                "poly",
                t(
                    [
                        (m - 0.07, top + 0.03),
                        (m + 0.07, top + 0.03),
                        (m + 0.08, top + 0.13),
                        (m - 0.08, top + 0.13),
                    ]
                ),
            ),
            ("poly", t([(m - 0.085, top + 0.15), (m + 0.085, top + 0.15), (m + 0.1, -0.1), (m - 0.1, -0.1)])),
        ]
        p.engrave(sails, None, "medium", split=t([(m, 0)])[0][0], weight=1.2)
        p.engrave([("poly", t([(m, top), (m + 0.06, top + 0.015), (m, top + 0.03)]))], "dark", weight=1)
    p.engrave([hull], "dark", weight=1.5)
    p.stroke(t([(-0.2, -0.07), (0.2, -0.07)]), 1.5)


def _lighthouse(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    p.engrave([("poly", t([(-0.16, 0.04), (-0.1, -0.04), (0.08, -0.05), (0.17, 0.04)]))], "dark")
    body = ("poly", t([(-0.07, -0.02), (0.07, -0.02), (0.045, -0.42), (-0.045, -0.42)]))
    p.engrave([body], "light", "medium", split=cx)
    bands = p.mask([("rect", (0, t([(0, -0.14)])[0][1], 1, t([(0, -0.2)])[0][1])),
                    ("rect", (0, t([(0, -0.28)])[0][1], 1, t([(0, -0.34)])[0][1]))])  # fmt: skip
    inside = p.mask([body])
    p.fill(ImageChops.multiply(bands, inside), "dark")
    p.outline([body])
    p.engrave([("poly", t(_rect(-0.075, -0.45, 0.075, -0.42)))], "dark")
    p.engrave([("poly", t(_rect(-0.04, -0.52, 0.04, -0.45)))], None)
    p.stroke(t([(0, -0.52), (0, -0.45)]), 1)
    p.engrave([("poly", t([(-0.05, -0.52), (0.05, -0.52), (0, -0.58)]))], "dark")
    for side in (-1, 1):  # the beam
        p.stroke(t([(side * 0.06, -0.5), (side * 0.16, -0.53)]), 1)
        p.stroke(t([(side * 0.06, -0.47), (side * 0.16, -0.44)]), 1)


def _windmill(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    p.engrave(
        [("poly", t([(-0.085, 0), (0.085, 0), (0.055, -0.3), (-0.055, -0.3)]))], "light", "medium", split=cx
    )
    p.engrave([("poly", t([(-0.07, -0.3), (0.07, -0.3), (0, -0.37)]))], "dark")
    p.engrave([("poly", t([(-0.025, 0), (0.025, 0), (0.025, -0.06), (-0.025, -0.06)]))], "dark", weight=1)
    hub = (0.0, -0.31)
    for k in range(4):
        a = math.radians(45 + 90 * k)
        ux, uy, vx, vy = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
        blade = [(hub[0] + ux * r + vx * w, hub[1] + uy * r + vy * w)
                 for r, w in ((0.05, 0), (0.23, 0), (0.23, 0.055), (0.05, 0.055))]  # fmt: skip
        p.engrave([("poly", t(blade))], "medium", weight=1)  # lighter than a night sky
        p.stroke(t([hub, (hub[0] + ux * 0.23, hub[1] + uy * 0.23)]), 1.5)
    p.engrave([_disk(*t([hub])[0], 0.018 * s)], "dark", weight=1)


def _tower(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    p.engrave([("poly", t(_rect(-0.08, 0, 0.08, -0.4)))], "light", "dark", split=cx + 0.02 * s)
    top = [(-0.1, -0.38), (0.1, -0.38), (0.1, -0.47)]
    for k in range(4):  # crenellations, right to left
        x1 = 0.1 - k * 0.055
        top += [(x1, -0.47), (x1 - 0.03, -0.47), (x1 - 0.03, -0.44), (x1 - 0.055, -0.44)]
    top += [(-0.1, -0.44), (-0.1, -0.47), (-0.1, -0.38)]
    p.engrave([("poly", t(top[:-1]))], "medium")
    for y in (-0.3, -0.18):
        p.engrave([("poly", t(_rect(-0.012, y, 0.012, y - 0.06)))], "night", weight=1)
    p.engrave([("poly", t(_rect(-0.03, 0, 0.03, -0.08)))], "dark", weight=1)


def _house(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    p.engrave([("poly", t(_rect(0.07, -0.2, 0.11, -0.33)))], "dark", weight=1.2)
    p.engrave([("poly", t(_rect(-0.16, 0, 0.16, -0.18)))], "light", "medium", split=cx + 0.05 * s)
    p.engrave([("poly", t([(-0.19, -0.18), (0.19, -0.18), (0, -0.33)]))], "dark")
    p.engrave([("poly", t(_rect(-0.03, 0, 0.03, -0.1)))], "night", weight=1)
    for x in (-0.11, 0.065):
        p.engrave([("poly", t(_rect(x, -0.08, x + 0.05, -0.13)))], None, weight=1)
        p.stroke(t([(x + 0.025, -0.08), (x + 0.025, -0.13)]), 0.8)


def _tree(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    p.engrave(
        [("poly", t([(-0.03, 0), (0.03, 0), (0.02, -0.18), (-0.02, -0.18)]))], "vertical", "night", split=cx
    )
    puffs = [
        (0, -0.31, 0.12),
        (-0.1, -0.24, 0.085),
        (0.1, -0.24, 0.085),
        (-0.06, -0.41, 0.08),
        (0.06, -0.41, 0.08),
    ]
    canopy = [_disk(*t([(x, y)])[0], r * s) for x, y, r in puffs]
    m = p.mask(canopy)
    p.fill(m, "stipple")
    shade = m.copy()
    ImageDraw.Draw(shade).polygon(p.px(t([(-0.3, -0.16), (0.3, -0.5), (-0.3, -0.5)])), fill=0)
    p.fill(shade, "dark")
    p.edge(m)


def _church(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx + 0.025 * s, base, s)
    p.engrave([("poly", t(_rect(-0.19, 0, 0.04, -0.14)))], "light", weight=1.5)
    p.engrave([("poly", t([(-0.2, -0.14), (0.05, -0.14), (0.03, -0.22), (-0.18, -0.22)]))], "dark")
    for x in (-0.15, -0.09, -0.03):
        p.engrave([("poly", t([(x, -0.03), (x + 0.025, -0.03), (x + 0.025, -0.09), (x + 0.0125, -0.105), (x, -0.09)]))],
                  "night", weight=0.8)  # fmt: skip
    p.engrave([("poly", t(_rect(0.04, 0, 0.13, -0.3)))], "light", "medium", split=cx + 0.11 * s)
    p.engrave([("poly", t([(0.03, -0.3), (0.14, -0.3), (0.085, -0.5)]))], "dark")
    p.stroke(t([(0.085, -0.5), (0.085, -0.57)]), 1.2)
    p.stroke(t([(0.06, -0.545), (0.11, -0.545)]), 1.2)
    p.engrave([("poly", t(_rect(0.07, 0, 0.1, -0.07)))], "night", weight=1)


def _bridge(p: Plate, cx: float, base: float, s: float) -> None:
    t = _tx(cx, base, s)
    body = ("poly", t([(-0.3, 0.02), (-0.23, -0.2), (0.23, -0.2), (0.3, 0.02)]))
    arches = [("poly", t(_arch(x, 0.06, -0.1, 0.02))) for x in (-0.15, 0.0, 0.15)]
    p.engrave([body], "light", "dark", split=cx + 0.1 * s, minus=arches)
    p.fill(p.mask(arches), "night")
    p.engrave([("poly", t(_rect(-0.24, -0.2, 0.24, -0.225)))], "dark", weight=1)
    for k in range(9):
        x = -0.22 + k * 0.055
        p.stroke(t([(x, -0.225), (x, -0.26)]), 1)
    p.stroke(t([(-0.23, -0.26), (0.23, -0.26)]), 1.2)


SUBJECTS: dict[str, Callable[[Plate, float, float, float], None]] = {
    "ship": _ship, "lighthouse": _lighthouse, "windmill": _windmill, "tower": _tower,
    "house": _house, "tree": _tree, "church": _church, "bridge": _bridge,
}  # fmt: skip
assert set(SUBJECTS) == set(ATTRIBUTES["subject"])


# ---------------------------------------------------------------- settings


def _curve(fn: Callable[[float], float], steps: int = 48) -> list[Point]:
    return [(i / steps, fn(i / steps)) for i in range(steps + 1)]


def _sea(p: Plate, h: float) -> None:
    p.fill(p.mask([("rect", (0, h, 1, 1))]), "waves")
    p.fill(p.mask([("rect", (0, h, 1, h + 0.035))]), "dusk")
    p.stroke([(0, h), (1, h)], 1)


def _hills(p: Plate, h: float) -> None:
    for crest, texture in (
        (lambda x: h - 0.07 - 0.06 * math.sin(math.pi * (1.6 * x + 0.15)), "light"),
        (lambda x: h + 0.08 - 0.05 * math.sin(math.pi * (2.2 * x + 1.1)), "medium"),
    ):
        line = _curve(crest)
        p.engrave([("poly", [*line, (1, 1), (0, 1)])], texture, weight=0)
        p.stroke(line, 1.5)


def _field(p: Plate, h: float) -> None:
    p.engrave([("rect", (0, h, 1, 1))], None, weight=0)
    for k in range(-8, 19):  # furrows converge on a vanishing point at the horizon
        p.stroke([(0.5 + (k - 5) * 0.012, h + 0.01), (0.5 + (k - 5) * 0.14, 1.0)], 1)
    hedge = [
        (
            "poly",
            [*_curve(lambda x: h - 0.025 - 0.012 * abs(math.sin(19 * x))), (1, h + 0.015), (0, h + 0.015)],
        )
    ]
    p.engrave(hedge, "stipple", weight=1)


_ROOFS = (
    (0.04, 0.1, 0.1),
    (0.14, 0.09, 0.14),
    (0.23, 0.12, 0.08),
    (0.35, 0.08, 0.12),
    (0.43, 0.11, 0.09),
    (0.54, 0.1, 0.15),
    (0.64, 0.12, 0.1),
    (0.76, 0.08, 0.13),
    (0.84, 0.12, 0.09),
)  # x, width, height


def _town(p: Plate, h: float) -> None:
    p.engrave([("rect", (0, h, 1, 1))], "paving", weight=1)
    for x, w, ht in _ROOFS:
        wall = ("poly", _rect(x, h, x + w, h - ht))
        p.engrave([wall], "vertical", weight=1)
        p.engrave(
            [("poly", [(x - 0.01, h - ht), (x + w + 0.01, h - ht), (x + w / 2, h - ht - 0.06)])],
            "dark",
            weight=1,
        )
        p.engrave(
            [("poly", _rect(x + w / 2 - 0.012, h - ht + 0.025, x + w / 2 + 0.012, h - ht + 0.05))],
            None,
            weight=0.8,
        )


SETTINGS: dict[str, Callable[[Plate, float], None]] = {
    "sea": _sea,
    "hills": _hills,
    "field": _field,
    "town": _town,
}
assert set(SETTINGS) == set(ATTRIBUTES["setting"])


# ---------------------------------------------------------------- sky


def _sun(p: Plate, x: float, y: float) -> None:
    rays = []
    for k in range(16):
        a, r = 2 * math.pi * k / 16, (0.14 if k % 2 == 0 else 0.115)
        da = 0.1
        rays.append(("poly", [(x + 0.08 * math.cos(a - da), y + 0.08 * math.sin(a - da)),
                              (x + r * math.cos(a), y + r * math.sin(a)),
                              (x + 0.08 * math.cos(a + da), y + 0.08 * math.sin(a + da))]))  # fmt: skip
    p.fill(p.mask([_disk(x, y, 0.16)]), None)
    p.engrave(rays, "dark", weight=0.5)
    p.engrave([_disk(x, y, 0.075)], None, weight=1.5)
    p.engrave([_disk(x, y, 0.045)], "horizontal", weight=0.8)


def _moon(p: Plate, x: float, y: float) -> None:
    crescent = p.mask([_disk(x, y, 0.1)], [_disk(x + 0.05, y - 0.035, 0.085)])
    p.fill(crescent, None)
    p.edge(crescent)


def _clouds(p: Plate, x: float, y: float) -> None:
    puffs = [
        (-0.1, 0.02, 0.06),
        (-0.03, -0.03, 0.08),
        (0.06, -0.01, 0.07),
        (0.12, 0.03, 0.05),
        (0.0, 0.04, 0.06),
    ]
    shapes = [_disk(x + dx, y + dy, r) for dx, dy, r in puffs]
    shapes.append(("rect", (x - 0.1, y + 0.03, x + 0.12, y + 0.08)))
    m = p.mask(shapes)
    p.fill(m, None)
    p.fill(p.mask(shapes, [("rect", (0, 0, 1, y + 0.035))]), "dusk")
    p.edge(m)


def _stars(p: Plate, keep_out: Sequence[tuple[float, float, float, float]]) -> None:
    for x, y in STAR_SLOTS:
        if any(x0 - 0.04 < x < x1 + 0.04 and y0 - 0.04 < y < y1 + 0.04 for x0, y0, x1, y1 in keep_out):
            continue
        p.fill(p.mask([_disk(x, y, 0.04)]), None)
        r, w = 0.032, 0.008
        star = [
            (x, y - r),
            (x + w, y - w),
            (x + r, y),
            (x + w, y + w),
            (x, y + r),
            (x - w, y + w),
            (x - r, y),
            (x - w, y - w),
        ]
        p.engrave([("poly", star)], "dark", weight=0.5)


def _birds(p: Plate, count: int) -> None:
    for x, y in BIRD_SLOTS[:count]:
        # A paper halo keeps the bird readable on a hatched night sky.
        p.fill(p.mask([("ellipse", (x - 0.07, y - 0.05, x + 0.07, y + 0.045))]), None)
        p.stroke(
            [
                (x - 0.055, y - 0.03),
                (x - 0.025, y - 0.01),
                (x, y + 0.02),
                (x + 0.025, y - 0.01),
                (x + 0.055, y - 0.03),
            ],
            2.0,
        )


# ---------------------------------------------------------------- the whole plate

# Subject footprint (half width, height) in plate units before scaling: where stars keep out.
_FOOTPRINT = {"ship": (0.2, 0.45), "lighthouse": (0.17, 0.6), "windmill": (0.26, 0.6), "tower": (0.1, 0.47),
              "house": (0.19, 0.33), "tree": (0.2, 0.5), "church": (0.2, 0.57), "bridge": (0.3, 0.26)}  # fmt: skip


def render(attrs: dict[str, str], size: int, rng: random.Random) -> np.ndarray:
    """One engraving of a scene: uint8 (size, size), dark ink on light paper. `rng` only
    jitters positions and scale by a few percent of the plate."""
    check_size(size)
    if not is_valid_scene(attrs):
        raise ValueError(f"not a valid scene: {attrs}")
    p = Plate(size)
    h = 0.6 + rng.uniform(-0.015, 0.015)
    scale = 1.12 * rng.uniform(0.96, 1.04)
    cx = POSITION_X[attrs["position"]] + rng.uniform(-0.015, 0.015)
    subject = attrs["subject"]
    base = {"ship": 0.75, "lighthouse": 0.78}.get(subject, 0.82) + rng.uniform(-0.01, 0.01)

    sky_texture = {"day": None, "dusk": "dusk", "night": "night"}[attrs["time"]]
    p.fill(p.mask([("rect", (0, 0, 1, h))]), sky_texture)
    SETTINGS[attrs["setting"]](p, h)

    sx, sy = SKY_X[attrs["position"]] + rng.uniform(-0.015, 0.015), 0.22 + rng.uniform(-0.01, 0.01)
    if attrs["sky"] == "stars":
        half_w, height = _FOOTPRINT[subject]
        body = (cx - half_w * scale, base - height * scale, cx + half_w * scale, 1.0)
        birds = [(x - 0.07, y - 0.05, x + 0.07, y + 0.05) for x, y in BIRD_SLOTS[: int(attrs["birds"])]]
        _stars(p, [body, *birds])
    elif attrs["sky"] != "none":
        {"sun": _sun, "moon": _moon, "clouds": _clouds}[attrs["sky"]](p, sx, sy)
    SUBJECTS[subject](p, cx, base, scale)
    _birds(p, int(attrs["birds"]))
    _border(p)
    return p.to_array()


def _border(p: Plate) -> None:
    """A double plate line: a heavy outer rule, a thin inner one, paper between and outside."""
    inner = 0.055
    p.fill(p.mask([("rect", (0, 0, 1, 1))], [("rect", (inner, inner, 1 - inner, 1 - inner))]), None)
    p.outline([("rect", (inner, inner, 1 - inner, 1 - inner))], 0.8)
    p.outline([("rect", (0.025, 0.025, 0.975, 0.975))], 1.6)



"""OpenMoji line art: a real, offline dataset of drawings with human-written captions.

The procedural engravings (pipeline/data/engrave.py) are the default dataset; this module turns
the black line-art set of OpenMoji (the npm package `openmoji@17.0.0`, CC BY-SA 4.0, openmoji.org)
into a dataset of the same imagefolder layout, so every later stage reads either one. Nothing is
downloaded here: `bash scripts/fetch_openmoji.sh` installs the package into a cache folder once
(`find_source` says so when it is missing) and the rasterizer is resvg-py (`pip install resvg-py`,
or the `openmoji` extra).

What is kept, from `data/openmoji.json` in its own order (stable for the pinned version):
  * base emoji only: entries with a `skintone` are variants whose black drawing is the same
    line art as their base's;
  * not the `component` group: skin-tone swatches and hair pieces, parts rather than drawings;
  * only entries with a `black/svg/<hexcode>.svg`;
  * one drawing per distinct black SVG: the black set draws colour-only differences identically
    (about 330 country and pride flags are the same bare rectangle, the coloured circles, hearts
    and jars one outline each, "woman: red hair" is "woman"), so their captions would contradict
    each other on one image. The first in file order keeps it ("woman", "full moon", "red heart").

The caption rule, one for all: `"a line drawing of " + article + annotation`, the annotation
lower-cased with typographic quotes made ASCII ("men’s room" -> "men's room"). The article is
"an" before a vowel, "a" otherwise, and none when the annotation starts with a digit or a
non-letter, or when its head noun (the words before the first " with ", " and ", " of ", " in ",
" on ", " for " or ":") is a plural ending in "s" (not "ss", "us", "is"). So "grinning face"
gives "a line drawing of a grinning face", "ATM sign" "a line drawing of an atm sign", "clapping
hands" "a line drawing of clapping hands". Tags stay in the metadata, out of the caption: they
are long keyword lists, not sentences.

Images: the whole 72x72 viewBox (its margin of about 10% included, not cropped: every drawing
keeps the scale its artists gave it, so a face and a building are not blown up alike) rendered
anti-aliased at `size` px, alpha composited onto white paper, as uint8 grayscale, black ink.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.contact_sheet import write_sheet
from pipeline.data.engrave import check_size, png_bytes

__all__ = [
    "Drawing",
    "OpenMojiError",
    "caption",
    "find_source",
    "load_drawings",
    "rasterize",
    "render_openmoji",
]

PACKAGE, VERSION = "openmoji", "17.0.0"
FETCH_COMMAND = "bash scripts/fetch_openmoji.sh"
NPM_COMMAND = f"npm install --prefix ~/.cache/inkseed/openmoji {PACKAGE}@{VERSION}"
DROPPED_GROUPS = ("component",)
# Words that end the head noun of an annotation: "grinning face with big eyes" -> "grinning face".
_HEAD_ENDS = (" with ", " and ", " of ", " in ", " on ", " for ", ":")
_ASCII_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})


class OpenMojiError(ValueError):
    """The OpenMoji source or its rasterizer is missing, or the package folder is not OpenMoji's."""


@dataclass(frozen=True)
class Drawing:
    """One kept emoji: its metadata.jsonl fields (minus file name and caption) and its SVG."""

    hexcode: str
    annotation: str
    group: str
    subgroup: str
    tags: tuple[str, ...]
    author: str
    svg: str  # path of black/svg/<hexcode>.svg


def default_home() -> Path:
    """The cache folder scripts/fetch_openmoji.sh installs into (same variable, same default)."""
    return Path(os.environ.get("INKSEED_OPENMOJI_HOME") or Path.home() / ".cache/inkseed/openmoji")


def find_source(path: str | None = None) -> Path:
    """The openmoji package folder (with data/openmoji.json and black/svg/): `path`, else
    $INKSEED_OPENMOJI, else the fetch script's cache. Raises OpenMojiError saying how to fetch it."""
    given = path or os.environ.get("INKSEED_OPENMOJI")
    where = Path(given).expanduser() if given else default_home() / "node_modules" / PACKAGE
    if not (where / "data" / "openmoji.json").is_file() or not (where / "black" / "svg").is_dir():
        raise OpenMojiError(
            f"no OpenMoji source at {where} (expected data/openmoji.json and black/svg/ of the npm "
            f"package {PACKAGE}@{VERSION}); fetch it with `{FETCH_COMMAND}` (prints the folder; "
            f"export INKSEED_OPENMOJI=<it> or pass --openmoji-dir) or `{NPM_COMMAND}`"
        )
    return where


def _resvg() -> ModuleType:
    """resvg_py, imported on first use: only this source needs it (the `openmoji` extra)."""
    try:
        import resvg_py
    except ImportError as e:
        raise OpenMojiError(
            "rasterizing OpenMoji needs the PyPI package resvg-py: pip install resvg-py "
            "(or pip install -e '.[openmoji]')"
        ) from e
    return resvg_py


def _split_tags(*fields: str) -> tuple[str, ...]:
    """Comma-separated tag fields as one tuple, first occurrence kept (Unicode's tags, then OpenMoji's)."""
    tags = (t.strip() for f in fields for t in (f or "").split(","))
    return tuple(dict.fromkeys(t for t in tags if t))


def load_drawings(source: Path) -> list[Drawing]:
    """The kept drawings (see the module docstring), in data/openmoji.json's order."""
    entries = json.loads((source / "data" / "openmoji.json").read_text(encoding="utf-8"))
    kept, seen_svgs = [], set()
    for e in entries:
        svg = source / "black" / "svg" / f"{e['hexcode']}.svg"
        if e.get("skintone") or e.get("group") in DROPPED_GROUPS or not svg.is_file():
            continue
        digest = hashlib.sha256(svg.read_bytes()).digest()
        if digest in seen_svgs:
            continue
        seen_svgs.add(digest)
        kept.append(
            Drawing(
                hexcode=e["hexcode"],
                annotation=e["annotation"],
                group=e["group"],
                subgroup=e.get("subgroups", ""),
                tags=_split_tags(e.get("tags", ""), e.get("openmoji_tags", "")),
                author=e.get("openmoji_author", ""),
                svg=str(svg),
            )
        )
    return kept


def _article(text: str) -> str:
    """The article ("a ", "an " or "") of a lower-cased annotation; the rule is in the module docstring."""
    cut = min((i for i in (text.find(w) for w in _HEAD_ENDS) if i > 0), default=len(text))
    head = text[:cut].strip()
    plural = head.endswith("s") and not head.endswith(("ss", "us", "is"))
    if not text[:1].isalpha() or plural:
        return ""
    return "an " if text[0] in "aeiou" else "a "


def caption(annotation: str) -> str:
    """The caption of a drawing from its annotation: "a line drawing of a grinning face"."""
    text = " ".join(annotation.translate(_ASCII_QUOTES).lower().split())
    return f"a line drawing of {_article(text)}{text}"


def rasterize(svg: str | bytes, size: int) -> np.ndarray:
    """(size, size) uint8 grayscale of an SVG file's text: black ink on white, anti-aliased."""
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    # skip_system_fonts: the drawings have no text, and the machine's fonts must not change a pixel.
    png = _resvg().svg_to_bytes(svg_string=text, width=size, height=size, skip_system_fonts=True)
    rgba = Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    # Transparent where there is no ink: composite onto white paper before dropping the alpha.
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(paper, rgba).convert("L"))


def _file_name(d: Drawing) -> str:
    # Named by hexcode, not by position: a name (and so its train/val split, a hash of the name)
    # stays the same whatever `limit` is and across OpenMoji versions that add emoji.
    return f"images/{d.hexcode}.png"


def _render_chunk(out: str, size: int, drawings: list[Drawing]) -> list[str]:
    """Render and write some drawings; returns their metadata.jsonl lines."""
    lines = []
    for d in drawings:
        image = rasterize(Path(d.svg).read_text(encoding="utf-8"), size)
        storage.write_bytes(storage.join(out, _file_name(d)), png_bytes(image))
        fields = {k: v for k, v in asdict(d).items() if k != "svg"}  # tags: a tuple, a JSON list
        lines.append(json.dumps({"file_name": _file_name(d), "text": caption(d.annotation), **fields}))
    return lines


def render_openmoji(
    out: str, size: int = 64, source: str | None = None, limit: int | None = None, workers: int = 1
) -> int:
    """Write the kept drawings (the first `limit` of them when given) to `out` (local path or
    s3://): images/<HEXCODE>.png, metadata.jsonl (file_name, text, hexcode, annotation, group,
    subgroup, tags, author) and contact_sheet.png (the first 16). Returns the count. Same
    arguments and source, same bytes, whatever `workers` is."""
    check_size(size)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    _resvg()  # fail before any work when the rasterizer is missing
    drawings = load_drawings(find_source(source))[:limit]
    if not drawings:
        raise OpenMojiError(f"{source or 'the OpenMoji source'}: no drawing left to render")
    chunks = [drawings[i : i + 250] for i in range(0, len(drawings), 250)]
    if workers == 1:
        parts = [_render_chunk(out, size, c) for c in chunks]
    else:
        # spawn, not fork, as in engrave.render_dataset: the caller may hold threads and their locks.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, [out] * len(chunks), [size] * len(chunks), chunks))
    lines = [line for part in parts for line in part]
    storage.write_bytes(storage.join(out, "metadata.jsonl"), ("\n".join(lines) + "\n").encode())
    first = drawings[:16]
    write_sheet(
        [rasterize(Path(d.svg).read_text(encoding="utf-8"), size) for d in first],
        [d.hexcode for d in first],
        [caption(d.annotation) for d in first],
        storage.join(out, "contact_sheet.png"),
    )
    return len(drawings)

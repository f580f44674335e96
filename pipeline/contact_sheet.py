"""A contact sheet of a generation output: the first samples' engravings with their captions.

`python -m pipeline.contact_sheet OUT` reads OUT/manifest/*.parquet (pipeline/manifest.py), takes
the rows of the smallest seeds, and writes OUT/contact_sheet.png: one tile per sample, the
engraving scaled up without smoothing (so hatching stays crisp), its seed and alignment, and its
caption wrapped underneath. OUT can be a local folder or s3://. scripts/demo.sh calls it last.
"""

from __future__ import annotations

import argparse
import io
import textwrap

import numpy as np
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage

PAPER = 255  # sheet background: white, like the plates' paper
TEXT_LINES = 5  # caption lines under each tile; longer captions end with "..."


class ContactSheetError(RuntimeError):
    """An output folder with no manifest rows to show."""


def first_rows(out: str, count: int) -> list[dict]:
    """Manifest rows (seed, caption, image_path, alignment) of the `count` smallest seeds."""
    # Only finished parts: an interrupted local write can leave a part-*.parquet.tmp-* file behind.
    parts = storage.list_files(storage.join(out, "manifest"), ".parquet")
    if not parts:
        raise ContactSheetError(f"{out}: no manifest/*.parquet (is this a jobs.generate output?)")
    fs, _ = storage.filesystem(out)
    dataset = pads.dataset([storage.filesystem(p)[1] for p in parts], format="parquet", filesystem=fs)
    table = dataset.to_table(columns=["seed", "caption", "image_path", "alignment"])
    if table.num_rows == 0:
        raise ContactSheetError(f"{out}: the manifest has no rows")
    order = np.argsort(table["seed"].to_numpy(), kind="stable")[:count]
    return table.take(order).to_pylist()


def render_sheet(
    images: list[np.ndarray], labels: list[str], captions: list[str], *, columns: int = 4, tile: int = 192
) -> Image.Image:
    """Lay out (H, W) uint8 images as `tile`-pixel squares with a label and a wrapped caption each."""
    if not images:
        raise ContactSheetError("no images to lay out")
    font = ImageFont.load_default(size=max(10, tile // 14))
    line_h = int(font.size * 1.3)
    chars_per_line = max(8, int(tile / (font.size * 0.55)))
    cell_w, cell_h = tile + 16, tile + 16 + line_h * (TEXT_LINES + 1)
    rows = -(-len(images) // columns)
    sheet = Image.new("L", (cell_w * min(columns, len(images)), cell_h * rows), PAPER)
    draw = ImageDraw.Draw(sheet)
    for i, (image, label, caption) in enumerate(zip(images, labels, captions)):
        x, y = (i % columns) * cell_w + 8, (i // columns) * cell_h + 8
        # NEAREST keeps one-pixel hatching lines sharp when a 64 px plate is shown at 192 px.
        sheet.paste(Image.fromarray(image, mode="L").resize((tile, tile), Image.NEAREST), (x, y))
        lines = [label, *textwrap.wrap(caption, chars_per_line)]
        if len(lines) > TEXT_LINES + 1:
            lines = [*lines[:TEXT_LINES], lines[TEXT_LINES][: chars_per_line - 3] + "..."]
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 4 + j * line_h), line, fill=0, font=font)
    return sheet


def write_contact_sheet(out: str, count: int = 16, columns: int = 4) -> str:
    """Write OUT/contact_sheet.png from the manifest's `count` smallest seeds; return its path/URI."""
    rows = first_rows(out, count)
    images = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(out, r["image_path"]))))) for r in rows]
    labels = [f"seed {r['seed']}  align {r['alignment']:+.2f}" for r in rows]
    sheet = render_sheet(images, labels, [r["caption"] for r in rows], columns=columns)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    target = storage.join(out, "contact_sheet.png")
    storage.write_bytes(target, buf.getvalue())
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="generation output root (local folder or s3://...)")
    parser.add_argument("--count", type=int, default=16, help="samples on the sheet (smallest seeds first)")
    parser.add_argument("--columns", type=int, default=4, help="tiles per row")
    args = parser.parse_args()
    if args.count < 1 or args.columns < 1:
        parser.error("--count and --columns must be >= 1")
    print(write_contact_sheet(args.out, args.count, args.columns))


if __name__ == "__main__":
    main()

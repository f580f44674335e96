"""The one contact-sheet renderer: images with a label and a caption each, as PNG and as HTML.

Every stage uses it: the datasets of jobs.prepare_data, the evaluation report and generation
outputs. One tile per sample, the image scaled up without smoothing (so hatching stays crisp),
its label (seed, alignment) and its caption wrapped underneath; the HTML page embeds the images
as data URIs, so it is one self-contained file.

`python -m pipeline.contact_sheet OUT` reads OUT/manifest/*.parquet (pipeline/generation/manifest.py),
takes the rows of the smallest seeds and writes OUT/contact_sheet.png and .html, whatever the
output's format (image files, tar shards or images inside the parts). OUT can be a local folder or
s3://. jobs.generate writes it at the end of every run; this command remakes it.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import textwrap
from collections.abc import Sequence

import numpy as np
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from model.images import png_bytes
from pipeline import storage
from pipeline.generation.formats import read_images

PAPER = 255  # sheet background: white, like the plates' paper
TEXT_LINES = 5  # caption lines under each tile; longer captions end with "..."


class ContactSheetError(ValueError):
    """Nothing to lay out: no images, unequal lists, or an output folder with no manifest rows."""


def first_rows(out: str, count: int) -> list[dict]:
    """Manifest rows (seed, caption, image_path, alignment, and a webdataset output's tar_offset
    and tar_size) of the `count` smallest seeds."""
    # Only finished parts: an interrupted local write can leave a dot-prefixed temp file behind.
    parts = storage.list_files(storage.join(out, "manifest"), ".parquet")
    if not parts:
        raise ContactSheetError(f"{out}: no manifest/*.parquet (is this a jobs.generate output?)")
    fs, _ = storage.filesystem(out)
    dataset = pads.dataset([storage.filesystem(p)[1] for p in parts], format="parquet", filesystem=fs)
    wanted = ["seed", "caption", "image_path", "alignment", "tar_offset", "tar_size"]
    table = dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names])
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


def render_html(images: Sequence[np.ndarray], labels: Sequence[str], captions: Sequence[str], title: str) -> str:
    """A self-contained HTML page of the same tiles (images embedded as PNG data URIs)."""
    cells = []
    for image, label, caption in zip(images, labels, captions):
        data = base64.b64encode(png_bytes(np.asarray(image))).decode()
        cells.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(label)}"><figcaption>'
            f"<b>{html.escape(label)}</b><br>{html.escape(caption)}</figcaption></figure>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;background:#fff}main{display:grid;grid-template-columns:repeat(auto-fill,200px);gap:12px}"
        "figure{margin:0}img{width:192px;height:192px;image-rendering:pixelated;border:1px solid #ccc}"
        "figcaption{font-size:12px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(cells)} samples</p><main>\n" + "\n".join(cells) + "\n</main></body></html>\n"
    )


def write_sheet(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    captions: Sequence[str],
    png_uri: str,
    html_uri: str | None = None,
    *,
    columns: int = 4,
    title: str = "inkseed contact sheet",
) -> None:
    """Write the PNG sheet (and the HTML page when html_uri is given); local paths or s3://."""
    if not (len(images) == len(labels) == len(captions)) or not len(images):
        raise ContactSheetError(
            f"a contact sheet needs as many images, labels and captions (> 0): "
            f"{len(images)}, {len(labels)}, {len(captions)}"
        )
    images = [np.asarray(i, dtype=np.uint8) for i in images]
    storage.write_bytes(png_uri, png_bytes(render_sheet(images, list(labels), list(captions), columns=columns)))
    if html_uri is not None:
        storage.write_bytes(html_uri, render_html(images, labels, captions, title).encode())


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(data)))
    except OSError as e:  # PIL's errors for a damaged PNG
        raise ContactSheetError(f"{where}: not a readable PNG ({e})") from e


def write_contact_sheet(out: str, count: int = 16, columns: int = 4) -> str:
    """Write OUT/contact_sheet.png and .html from the manifest's `count` smallest seeds; return
    the PNG's path/URI."""
    rows = first_rows(out, count)
    images = [_decode(data, storage.join(out, r["image_path"])) for data, r in zip(read_images(out, rows), rows)]
    labels = [f"seed {r['seed']}  align {r['alignment']:+.2f}" for r in rows]
    target = storage.join(out, "contact_sheet.png")
    write_sheet(images, labels, [r["caption"] for r in rows], target, storage.join(out, "contact_sheet.html"), columns=columns)
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

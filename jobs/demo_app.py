"""The Gradio app of `jobs.demo`: five tabs over one `jobs.sample.Sampler`, each event an API endpoint.

    Generate      seed box, random seed, sample count -> images, captions, alignment   api: /generate
    Caption       an uploaded image -> its caption (i2t)                                api: /caption
    Illustrate    a caption, seed, count -> images (t2i)                               api: /illustrate
    Interpolate   two seeds, steps -> a strip + its captions                            api: /interpolate
    Browse a run  a jobs.generate output: filter, sort, page (jobs/demo_browse.py)      api: /browse

Every handler calls the same Sampler methods as `python -m jobs.sample`, and the images shown are
those methods' PNG bytes written as files (Gradio serves a file path as it is, so a client
downloads the same bytes, and sha256, as jobs.sample writes and jobs.generate's manifest lists).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from jobs.demo_browse import SORTS, BrowseError, image_file, query_page
from jobs.sample import SampleError, Sampler, read_image

MAX_SAMPLES = 16  # per Generate / Illustrate click: a few seconds on a laptop CPU
EXAMPLE_CAPTION = "an engraving of a windmill on the hills, on the left, under a crescent moon at night"
SAMPLE_HEADERS = ["seed", "alignment", "caption", "image_sha256"]
WIDTHS = ["7%", "10%", "63%", "20%"]


class ImageCache:
    """PNG bytes -> a file Gradio may serve (under the system temp dir), named by its sha256."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="inkseed-demo-"))

    def put(self, png: bytes, sha256: str) -> str:
        path = self.root / f"{sha256}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(png)
            tmp.replace(path)
        return str(path)

    def copy(self, source: Path, sha256: str) -> str:
        path = self.root / f"{sha256}.png"
        if not path.exists():
            shutil.copyfile(source, path)
        return str(path)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _seeds(seed: float | None, count: float | None) -> list[int]:
    if seed is None or int(seed) < 0:
        raise gr.Error("the seed must be a whole number >= 0")
    return list(range(int(seed), int(seed) + max(1, min(MAX_SAMPLES, int(count or 1)))))


def _samples_out(made: list[tuple[dict[str, Any], bytes]], cache: ImageCache):
    """Sampler records -> (gallery items, table rows)."""
    gallery = [(cache.put(png, r["image_sha256"]), f"{r['seed']}: {r['caption']} ({r['alignment']:.3f})")
               for r, png in made]  # fmt: skip
    table = [[r["seed"], round(r["alignment"], 4), r["caption"], r["image_sha256"]] for r, _ in made]
    return gallery, table


class Handlers:
    """The event functions (their signatures are the API endpoints' parameters)."""

    def __init__(self, sampler: Sampler, cache: ImageCache, page_size: int) -> None:
        self.sampler, self.cache, self.page_size = sampler, cache, page_size

    def generate(self, seed: float, count: float, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        made = self.sampler.generate(_seeds(seed, count), lambda f, d: progress(f, desc=d))
        return _samples_out(made, self.cache)

    def caption(self, image: str | None) -> str:
        if not image:
            raise gr.Error("upload an image first")
        try:
            return self.sampler.caption([read_image(image)])[0]
        except SampleError as e:
            raise gr.Error(str(e)) from e

    def illustrate(self, text: str, seed: float, count: float, progress=gr.Progress()):  # noqa: B008
        if not (text or "").strip():
            raise gr.Error("write a caption to illustrate")
        progress(0, desc="illustrating")
        return _samples_out(self.sampler.illustrate(text, _seeds(seed, count)), self.cache)

    def interpolate(self, seed_a: float, seed_b: float, steps: float, progress=gr.Progress()):  # noqa: B008
        if seed_a is None or seed_b is None or min(int(seed_a), int(seed_b)) < 0:
            raise gr.Error("both seeds must be whole numbers >= 0")
        progress(0, desc="interpolating")
        record, png = self.sampler.interpolate(int(seed_a), int(seed_b), max(2, int(steps)))
        rows = [[round(f["t"], 4), round(f["alignment"], 4), f["caption"]] for f in record["frames"]]
        return self.cache.put(png, record["image_sha256"]), rows

    def browse(self, run: str, words: str, align_min: float, align_max: float, sort: str, page: float):
        """One page: (gallery, table rows, a summary line, the page number actually shown)."""
        try:
            found = query_page((run or "").strip(), words or "", (align_min, align_max), sort,
                               int(page or 1), self.page_size)  # fmt: skip
        except BrowseError as e:
            raise gr.Error(str(e)) from e
        gallery, missing = [], 0
        for r in found.rows:
            source = image_file(run.strip(), r["image_path"])
            missing += source is None
            if source is not None:
                label = f"{r['seed']}: {r['caption']} ({r['alignment']:.3f})"
                gallery.append((self.cache.copy(source, r["image_sha256"]), label))
        table = [[r["seed"], round(r["alignment"], 4), r["caption"], r["image_path"]] for r in found.rows]
        first = (found.page - 1) * self.page_size + 1
        summary = (f"**{found.total:,}** matching samples; showing {first:,}-{first + len(found.rows) - 1:,}, "
                   f"page {found.page:,} of {found.pages:,}" if found.total else "**no** matching samples")  # fmt: skip
        summary += f" ({missing} images missing)" if missing else ""
        return gallery, table, summary, found.page


def _generate_tab(h: Handlers) -> None:
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="generate-seed")
        count = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples (seed, seed+1, ...)")
    with gr.Row():
        lucky = gr.Button("Random seed", elem_id="random-seed")
        go = gr.Button("Generate", variant="primary", elem_id="generate-button")
    gallery = gr.Gallery(label="engravings", columns=4, height=320, format="png", elem_id="generate-gallery")
    table = gr.Dataframe(headers=SAMPLE_HEADERS, label="captions and alignment", column_widths=WIDTHS, elem_id="generate-table")
    lucky.click(lambda: random.randrange(2**31), outputs=seed, api_name="random_seed")
    go.click(h.generate, [seed, count], [gallery, table], api_name="generate")


def _caption_tab(h: Handlers) -> None:
    image = gr.Image(type="filepath", image_mode=None, label="an image (any size; read in grayscale)")
    go = gr.Button("Caption", variant="primary")
    text = gr.Textbox(label="caption", interactive=False)
    go.click(h.caption, image, text, api_name="caption")


def _illustrate_tab(h: Handlers) -> None:
    text = gr.Textbox(value=EXAMPLE_CAPTION, label="caption")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed (picks what the caption leaves open)")
        count = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="images")
    go = gr.Button("Illustrate", variant="primary")
    gallery = gr.Gallery(label="illustrations", columns=4, height=320, format="png")
    table = gr.Dataframe(headers=SAMPLE_HEADERS, label="alignment with the caption", column_widths=WIDTHS)
    go.click(h.illustrate, [text, seed, count], [gallery, table], api_name="illustrate")


def _interpolate_tab(h: Handlers) -> None:
    with gr.Row():
        a = gr.Number(value=0, precision=0, minimum=0, label="seed A")
        b = gr.Number(value=1, precision=0, minimum=0, label="seed B")
        steps = gr.Slider(2, 16, value=8, step=1, label="steps (both ends included)")
    go = gr.Button("Interpolate", variant="primary")
    strip = gr.Image(type="filepath", format="png", label="A -> B", interactive=False, elem_id="interpolate-strip")
    table = gr.Dataframe(headers=["t", "alignment", "caption"], label="captions along the way")
    go.click(h.interpolate, [a, b, steps], [strip, table], api_name="interpolate")


def _browse_tab(h: Handlers, run: str) -> None:
    folder = gr.Textbox(value=run, label="run folder (a jobs.generate --output)")
    with gr.Row():
        words = gr.Textbox(label="caption has the words", placeholder="windmill night")
        lo = gr.Slider(-1, 1, value=-1, step=0.01, label="alignment at least")
        hi = gr.Slider(-1, 1, value=1, step=0.01, label="alignment at most")
        sort = gr.Dropdown(list(SORTS), value="seed", label="sort by")
    with gr.Row():
        prev, page, nxt = gr.Button("Previous page"), gr.Number(value=1, precision=0, label="page"), gr.Button("Next page")
        go = gr.Button("Browse", variant="primary")
    summary = gr.Markdown()
    gallery = gr.Gallery(label="samples", columns=6, height=480, format="png")
    table = gr.Dataframe(headers=["seed", "alignment", "caption", "image_path"], label="this page")
    inputs, outputs = [folder, words, lo, hi, sort, page], [gallery, table, summary, page]
    go.click(h.browse, inputs, outputs, api_name="browse")
    step = {"api_visibility": "private", "show_progress": "minimal"}
    prev.click(lambda *a: h.browse(*a[:-1], (a[-1] or 1) - 1), inputs, outputs, **step)
    nxt.click(lambda *a: h.browse(*a[:-1], (a[-1] or 1) + 1), inputs, outputs, **step)


def build_app(sampler: Sampler, run: str, page_size: int = 24) -> tuple[gr.Blocks, ImageCache]:
    """The Blocks app and its image cache (close it when the app stops)."""
    cache = ImageCache()
    h = Handlers(sampler, cache, page_size)
    with gr.Blocks(title="inkseed", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"# inkseed\nEngravings and their captions from one seed. Checkpoint: `{sampler.settings.checkpoint}`"
                    f" (digest `{sampler.ink.digest[:12]}`).")  # fmt: skip
        with gr.Tab("Generate"):
            _generate_tab(h)
        with gr.Tab("Caption an image"):
            _caption_tab(h)
        with gr.Tab("Illustrate a caption"):
            _illustrate_tab(h)
        with gr.Tab("Interpolate"):
            _interpolate_tab(h)
        with gr.Tab("Browse a run"):
            _browse_tab(h, run)
    return app, cache

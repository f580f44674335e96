"""One-off samples from the command line: seeds, captions of images, illustrations, interpolations.

    python -m jobs.sample --seed 42 --seed 43 --out outputs/sample   # OUT/42.png, OUT/43.png + captions
    python -m jobs.sample --caption-image a.png b.png                # i2t: a caption per image
    python -m jobs.sample --illustrate "a print of a ship at sea" --seed 7    # t2i: OUT/illustrate-7.png
    python -m jobs.sample --interpolate 3 9 --steps 8                # OUT/interpolate-3-9.png + captions
    python -m jobs.sample --seed 42 --json                           # the same result as JSON

Ray is never started: the model runs in this process. A seed's PNG bytes and caption equal its row of a
`jobs.generate` run (image_sha256, caption, alignment) with the same checkpoint and settings
(`--batch-size`, `--ddim-steps` = generate's `--steps`, `--bf16`, greedy captions): both make it with
`pipeline.generation.sampler.generate_seeds` and `encode_png`. `jobs.demo` serves the same
`Sampler` in a browser.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import tyro
from PIL import Image, UnidentifiedImageError

from jobs.cli import argv_or_sys, parse
from model.checkpoint import CheckpointError
from model.sampling import Device, resolve_device
from pipeline import storage
from pipeline.generation.sampler import encode_png, generate_seeds
from pipeline.storage import StorageError

# Paper-white pixels between the frames of an interpolation strip.
STRIP_GUTTER = 4

Progress = Callable[[float, str], None]  # (fraction done, what is running): the demo's progress bar


class SampleError(ValueError):
    """A flag or an input file this command cannot use (named in the message)."""


@dataclass
class SampleSettings:
    """What every mode shares: the checkpoint and how it samples (jobs.demo has the same flags)."""

    # Checkpoint directory (local or s3://) as jobs.train exports it.
    checkpoint: str = "checkpoints/default"
    # Beam width of the captions (1 = greedy, as jobs.generate).
    beams: int = 1
    # Caption temperature when sampling from seeds (0 = greedy, as jobs.generate); drawn from the seed's own
    # generator, so still reproducible.
    temperature: float = 0.0
    # Seeds per model call, short calls padded: keep jobs.generate's --batch-size for its exact PNG bytes.
    batch_size: int = 64
    # DDIM steps of the latent prior (jobs.generate's --steps); None = the checkpoint's.
    ddim_steps: int | None = None
    # bf16 autocast (as jobs.generate's --bf16); None = on for CUDA, off for CPU.
    bf16: bool | None = None
    # Where the model runs; "auto" = CUDA when this process sees a GPU.
    device: Device = "auto"

    def validate(self) -> None:
        checks = {
            "--beams must be >= 1": self.beams >= 1,
            "--temperature must be >= 0": self.temperature >= 0,
            "--batch-size must be >= 1": self.batch_size >= 1,
            "--ddim-steps must be >= 1": self.ddim_steps is None or self.ddim_steps >= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise SampleError(message)


@dataclass
class SampleConfig:
    """The job's flags: one mode (--seed, --caption-image, --illustrate or --interpolate) + settings."""

    settings: Annotated[SampleSettings, tyro.conf.arg(name="")] = field(default_factory=SampleSettings)
    # Seeds to generate, an image and a caption each (repeat the flag: --seed 42 --seed 43); with
    # --illustrate, the seeds of its images.
    seed: Annotated[list[int], tyro.conf.UseAppendAction] = field(default_factory=list)
    # Folder (local or s3://) for the PNGs: <seed>.png, illustrate-<seed>.png, interpolate-<a>-<b>.png.
    out: str = "outputs/sample"
    # Image files to caption (i2t): --caption-image a.png b.png.
    caption_image: list[str] = field(default_factory=list)
    # A caption to illustrate (t2i): one image per --seed.
    illustrate: str | None = None
    # Two seeds to interpolate between (--interpolate A B): a strip of --steps samples.
    interpolate: tuple[int, int] | None = None
    # Samples on the --interpolate strip, both ends included.
    steps: int = 8
    # Print the result as JSON instead of text.
    json: bool = False

    def mode(self) -> str:
        """The one mode the flags ask for; SampleError names the conflict or what is missing."""
        asked = [m for m, on in (("caption", self.caption_image), ("illustrate", self.illustrate is not None),
                                 ("interpolate", self.interpolate is not None)) if on]  # fmt: skip
        if len(asked) > 1:
            raise SampleError("give one of --caption-image, --illustrate and --interpolate, not several")
        if any(s < 0 for s in self.seed + list(self.interpolate or ())):
            raise SampleError("seeds must be >= 0")
        mode = asked[0] if asked else "generate"
        if mode == "generate" and not self.seed:
            raise SampleError("nothing to do: give --seed N, --caption-image PATH, --illustrate TEXT or --interpolate A B")
        if mode in ("caption", "interpolate") and self.seed:
            raise SampleError(f"--seed does not apply to --{'caption-image' if mode == 'caption' else mode}")
        if mode == "illustrate" and not self.seed:
            raise SampleError("--illustrate needs --seed N (one image per seed)")
        if mode == "illustrate" and not self.illustrate.strip():
            raise SampleError("--illustrate needs a caption, got an empty one")
        if mode == "interpolate" and self.steps < 2:
            raise SampleError("--steps must be >= 2 (both ends of the strip)")
        return mode


def _picture(image: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """One uint8 (H, W) image -> its record fields (sha256, size) and its PNG bytes."""
    png, sha = encode_png(image)
    return {"image_sha256": sha, "width": int(image.shape[1]), "height": int(image.shape[0])}, png


def read_image(path: str) -> np.ndarray:
    """An image file (local or s3://, any format PIL reads) -> uint8 (H, W) grayscale."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            return np.array(img.convert("L"), dtype=np.uint8)  # a writable copy (torch warns otherwise)
    except (StorageError, OSError, UnidentifiedImageError) as e:
        raise SampleError(f"--caption-image {path!r}: not a readable image ({e})") from e


def strip(images: np.ndarray) -> np.ndarray:
    """Frames uint8 (N, H, W) side by side with paper-white gutters -> (H, W*N + gutters)."""
    n, h, _ = images.shape
    gutter = np.full((h, STRIP_GUTTER), 255, np.uint8)
    parts = [p for i, frame in enumerate(images) for p in ((gutter,) if i else ()) + (frame,)]
    return np.concatenate(parts, axis=1) if n else np.zeros((h, 0), np.uint8)


class Sampler:
    """A loaded checkpoint and its settings; each mode returns JSON-ready records and PNG bytes.

    One model call at a time (the demo's handlers run in threads).
    """

    def __init__(self, settings: SampleSettings) -> None:
        settings.validate()
        try:
            self.ink = storage.open_checkpoint(settings.checkpoint, str(resolve_device(settings.device)))
        except (CheckpointError, StorageError, RuntimeError) as e:
            raise SampleError(f"--checkpoint {settings.checkpoint!r}: {e}") from e
        self.settings = settings
        self.lock = threading.Lock()

    def generate(self, seeds: list[int], progress: Progress | None = None) -> list[tuple[dict[str, Any], bytes]]:
        """Seeds -> [({seed, caption, alignment, image_sha256, width, height}, PNG bytes)], as
        jobs.generate makes them: calls of batch_size seeds through generate_seeds."""
        s, out = self.settings, []
        for start in range(0, len(seeds), s.batch_size):
            if progress:
                progress(start / len(seeds), f"sampling seeds {start + 1}-{min(len(seeds), start + s.batch_size)}")
            chunk = [int(x) for x in seeds[start : start + s.batch_size]]
            with self.lock:
                samples = generate_seeds(self.ink, chunk, s.batch_size, steps=s.ddim_steps, bf16=s.bf16,
                                         temperature=s.temperature, beams=s.beams)  # fmt: skip
            for seed, image, text, align in zip(chunk, samples.images, samples.captions, samples.alignment):
                fields, png = _picture(image)
                out.append(({"seed": seed, "caption": text, "alignment": float(align), **fields}, png))
        return out

    def caption(self, images: list[np.ndarray]) -> list[str]:
        """Images uint8 (H, W) -> their captions (i2t), one model call per image so that an image's
        caption never depends on the others."""
        with self.lock:
            return [self.ink.caption(image[None], beams=self.settings.beams, autocast=self.settings.bf16)[0]
                    for image in images]  # fmt: skip

    def illustrate(self, text: str, seeds: list[int]) -> list[tuple[dict[str, Any], bytes]]:
        """A caption and seeds -> [({seed, caption, alignment, image_sha256, ...}, PNG bytes)] (t2i);
        alignment scores each image against the caption it illustrates."""
        s, out = self.settings, []
        for start in range(0, len(seeds), s.batch_size):
            chunk = [int(x) for x in seeds[start : start + s.batch_size]]
            # A full batch of batch_size rows, as generate_seeds makes: a seed's PNG bytes do not
            # depend on how many other seeds share its call (CPU kernels reduce in another order).
            padded = chunk + [chunk[-1]] * (s.batch_size - len(chunk))
            captions = [text] * len(padded)
            with self.lock:
                images = self.ink.illustrate(captions, padded, autocast=s.bf16)
                align = self.ink.alignment(images, captions, autocast=s.bf16)
            for seed, image, a in zip(chunk, images, align):
                fields, png = _picture(image)
                out.append(({"seed": seed, "caption": text, "alignment": float(a), **fields}, png))
        return out

    def interpolate(self, seed_a: int, seed_b: int, steps: int) -> tuple[dict[str, Any], bytes]:
        """Two seeds -> ({seed_a, seed_b, image_sha256, width, height, frames: [{index, t, caption,
        alignment}]}, the strip's PNG bytes)."""
        with self.lock:
            samples = self.ink.interpolate(int(seed_a), int(seed_b), steps, ddim_steps=self.settings.ddim_steps,
                                           autocast=self.settings.bf16)  # fmt: skip
        frames = [{"index": i, "t": i / (steps - 1), "caption": c, "alignment": float(a)}
                  for i, (c, a) in enumerate(zip(samples.captions, samples.alignment))]  # fmt: skip
        fields, png = _picture(strip(samples.images))
        return {"seed_a": int(seed_a), "seed_b": int(seed_b), **fields, "frames": frames}, png


def run(sampler: Sampler, cfg: SampleConfig) -> dict[str, Any]:
    """Run cfg's mode, write its PNGs under cfg.out; the result {mode, model_digest, samples | ...}."""
    mode = cfg.mode()
    result: dict[str, Any] = {"mode": mode, "checkpoint": cfg.settings.checkpoint, "model_digest": sampler.ink.digest}
    if mode == "caption":
        captions = sampler.caption([read_image(p) for p in cfg.caption_image])
        return {**result, "samples": [{"image": p, "caption": c} for p, c in zip(cfg.caption_image, captions)]}
    if mode == "interpolate":
        record, png = sampler.interpolate(*cfg.interpolate, cfg.steps)
        record["image_path"] = _write(cfg.out, f"interpolate-{record['seed_a']}-{record['seed_b']}.png", png)
        return {**result, **record}
    made = sampler.generate(cfg.seed) if mode == "generate" else sampler.illustrate(cfg.illustrate, cfg.seed)
    prefix = "" if mode == "generate" else "illustrate-"
    samples = [{**rec, "image_path": _write(cfg.out, f"{prefix}{rec['seed']}.png", png)} for rec, png in made]
    return {**result, "samples": samples}


def _write(out: str, name: str, data: bytes) -> str:
    path = storage.join(out, name)
    try:
        storage.write_bytes(path, data)
    except StorageError as e:
        raise SampleError(f"--out {out!r}: cannot write {name} ({e})") from e
    return path


def format_text(result: dict[str, Any]) -> str:
    """The result as lines for a person: one per sample (or frame)."""
    if result["mode"] == "caption":
        return "\n".join(f"{s['image']}: {s['caption']}" for s in result["samples"])
    if result["mode"] == "interpolate":
        head = f"strip {result['seed_a']} -> {result['seed_b']}: {result['image_path']}"
        rows = [f"  t={f['t']:.3f}  alignment {f['alignment']:.3f}  {f['caption']}" for f in result["frames"]]
        return "\n".join([head, *rows])
    return "\n".join(f"seed {s['seed']}  alignment {s['alignment']:.3f}  {s['image_path']}\n  {s['caption']}"
                     for s in result["samples"])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> SampleConfig:
    return parse(SampleConfig, argv_or_sys(argv), SampleConfig(), __doc__.split("\n")[0])


def main(cfg: SampleConfig) -> dict[str, Any]:
    """Check the flags, load the checkpoint, run the mode, print the result; returns it."""
    cfg.mode()  # flag errors before the checkpoint loads
    result = run(Sampler(cfg.settings), cfg)
    print(json.dumps(result, indent=2) if cfg.json else format_text(result))
    return result


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except SampleError as e:
        sys.exit(f"error: {e}")

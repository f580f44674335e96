"""Export a checkpoint for serving without PyTorch: ONNX graphs plus a numpy/onnxruntime sampler.

    pip install -e '.[onnx]'
    python -m jobs.export --checkpoint checkpoints/default --format onnx --out outputs/onnx
    python outputs/onnx/onnx_sampler.py outputs/onnx --seed 0 1 2      # torch not needed from here on

Writes the folder model/onnx_export.py describes (the prior's denoiser, the image decoder, the
caption decoder's start and cached step, the image and caption encoders, the tokenizer and
onnx_sampler.py), then checks its own parity: seeds 0..N-1 through the ONNX sampler and through
`model.sampling.generate` (fp32, CPU) must give equal captions and images within --max-pixel-diff.
It prints the result, records it in OUT/inkseed_onnx.json and exits 1 when the check fails.
Ray is never started. A failure ends with one line, `error: ...`, naming the file or URI and what
to do (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from jobs.cli import argv_or_sys, parse, run_job
from pipeline.storage import is_s3, open_checkpoint


class ExportError(ValueError):
    """A flag this job cannot use, or a missing optional dependency (named in the message)."""


@dataclass
class ExportArgs:
    """The job's flags."""

    # Checkpoint directory (local or s3://) as jobs.train exports it.
    checkpoint: str = "checkpoints/default"
    # What to export: onnx = ONNX graphs + a numpy sampler for onnxruntime (pip install -e '.[onnx]').
    format: Literal["onnx"] = "onnx"
    # Output folder (local): created if missing; files of an earlier export in it are replaced.
    out: str = "outputs/onnx"
    # Seeds 0..N-1 whose images and captions the export compares with PyTorch's generate() (0 = no check).
    parity_seeds: int = 64
    # Largest pixel difference (of 255) the parity check accepts; captions must be equal.
    max_pixel_diff: int = 2
    # ONNX opset of the graphs (14 or newer: scaled_dot_product_attention).
    opset: int = 17
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False

    def validate(self) -> None:
        if is_s3(self.out):
            raise ExportError(f"--out {self.out}: the export is written to a local folder (copy it to S3 afterwards)")
        if self.parity_seeds < 0 or self.max_pixel_diff < 0:
            raise ExportError("--parity-seeds and --max-pixel-diff must be >= 0")
        if self.opset < 14:
            raise ExportError(f"--opset {self.opset}: the caption transformers need opset 14 or newer")


def parse_args(argv: list[str] | None = None) -> ExportArgs:
    return parse(ExportArgs, argv_or_sys(argv), ExportArgs(), __doc__.split("\n")[0])


def main(args: ExportArgs) -> dict:
    """Export, check parity, print; returns the folder's meta (with "parity" when checked)."""
    args.validate()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx extra: pip install -e '.[onnx]' ({e})") from e
    from model.onnx_export import check_parity, export_onnx

    ink = open_checkpoint(args.checkpoint)
    meta = export_onnx(ink, args.out, opset=args.opset)
    print(f"exported {len(meta['graphs'])} ONNX graphs of {args.checkpoint} to {args.out}", flush=True)
    if args.parity_seeds:
        parity = check_parity(ink, args.out, args.parity_seeds, args.max_pixel_diff)
        print(parity.summary(), flush=True)
        meta["parity"] = parity.record()
    print(f"sample it: python {args.out}/onnx_sampler.py {args.out} --seed 0 1 2", flush=True)
    return meta


if __name__ == "__main__":
    config = run_job(parse_args)
    result = run_job(lambda: main(config))
    if not result.get("parity", {}).get("ok", True):
        sys.exit(f"error: the ONNX export in {config.out} does not match PyTorch (see the parity line above)")

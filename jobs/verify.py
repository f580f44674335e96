"""Verify a generation output: every manifest part and every image, in parallel on Ray tasks.

    python -m jobs.verify outputs/run1
    ray job submit --working-dir . -- python -m jobs.verify s3://bucket/run1

Reads OUT/run.json, then checks each part's schema, run_id, model digest and seed set, and each
image's existence and sha256, in the run's format: the PNG file, the tar member (with its .txt
and .json) or the bytes embedded in the part (pipeline/generation/verify.py). Prints one line per damaged part and
the counts of seeds lost, duplicated and mismatched; exits 1 when anything is wrong (then
`python -m jobs.generate <the run's flags> --repair` regenerates the damaged shards). It writes
nothing, so it may run beside a generation run (it then says the report is a snapshot).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from jobs.cli import argv_or_sys, parse
from jobs.ray_owner import run_owning_ray
from pipeline.generation.errors import one_line
from pipeline.generation.verify import VerifyReport, verify_output


@dataclass
class VerifyArgs:
    """The job's flags."""

    # The generation output to check (local folder or s3:// URI): the --output of jobs.generate.
    output: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    # For a run made from a seeds file that has moved: the file (it must hold the same seeds).
    seeds_file: str | None = None
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> VerifyArgs:
    return parse(VerifyArgs, argv_or_sys(argv), None, __doc__.split("\n")[0])


def run_verify(args: VerifyArgs) -> VerifyReport:
    report = verify_output(args.output, seeds_file=args.seeds_file)
    print("\n".join(report.lines()), flush=True)
    return report


def main(args: VerifyArgs) -> VerifyReport:
    """Verify; Ray starts (or is joined through RAY_ADDRESS) and is shut down if this started it."""
    return run_owning_ray(run_verify, args)


if __name__ == "__main__":
    job = parse_args()
    try:
        result = main(job)
    except BaseException as e:
        if job.debug or isinstance(e, SystemExit):
            raise
        sys.exit(f"error: {one_line(e)}")
    if not result.ok:
        sys.exit(
            f"error: {result.out} failed verification ({result.counts()}): rerun its jobs.generate with --repair"
        )

"""One-line errors: what `jobs.generate` and `jobs.verify` print instead of a traceback.

Errors a user can cause or meet (bad flags, a held lease, a damaged run.json, a full disk, an S3
bucket or endpoint that fails) are raised as GenerateError / ManifestError / StorageError whose
message names the file or URI and says what to do; `one_line` turns any exception into the
`error: ...` line. Errors raised inside Ray tasks and actors reach the driver wrapped by Ray Data
(UserCodeException), which keeps only their traceback text: `from_remote` rebuilds the inkseed
error from that text, so a full disk under an actor reads the same as one under the driver.
"""

from __future__ import annotations

import re

from pipeline.generation.config import GenerateError
from pipeline.generation.lease import LeaseHeld, LeaseLost
from pipeline.generation.manifest import ManifestError
from pipeline.storage import StorageError, describe

# The exception line of an inkseed error inside a remote traceback's text.
_REMOTE_LINE = re.compile(
    r"^(?:pipeline\.storage\.StorageError|pipeline\.generation\.\w+\.(\w+)): (.+)$", flags=re.M
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REMOTE_TYPES = {"GenerateError": GenerateError, "LeaseLost": LeaseLost, "LeaseHeld": LeaseHeld,
                 "ManifestError": ManifestError, None: StorageError}  # fmt: skip


def from_remote(e: BaseException) -> BaseException:
    """The inkseed error a Ray task or actor raised (the innermost one in its traceback text),
    or a GenerateError quoting the remote exception's last line when it was something else."""
    text = _ANSI.sub("", str(e))
    found = _REMOTE_LINE.findall(text)
    if found:
        kind, message = found[0]  # the first is the original; later ones are Ray's wrappers
        return _REMOTE_TYPES.get(kind or None, GenerateError)(message)
    lines = [ln for ln in text.splitlines() if re.match(r"^\w[\w.]*(Error|Exception)\b", ln)]
    last = lines[0] if lines else (text.strip().splitlines() or [type(e).__name__])[-1]
    return GenerateError(
        f"a Ray task of the generation failed: {last.strip()[:300]} (rerun with --debug for details)"
    )


def one_line(e: BaseException) -> str:
    """The message after `error: ` for any exception (known ones already name their file)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted: rerun the same command to resume where it stopped"
    if isinstance(e, (GenerateError, ManifestError, StorageError, ValueError)):
        return " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return f"{e.filename}: {describe(e)}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (rerun with --debug for the traceback)"

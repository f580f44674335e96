"""The run's export, `<storage_path>/<name>/export`, replaced so that a reader never finds none.

The final checkpoint's `model/` folder is copied to a sibling staging folder
(`export.staging-<id>`), loaded back and verified there (its sha256 hashes, shapes, finite
weights), and only then swapped in; until the swap the old export stays whole and readable, and
a failed copy (a full disk, a corrupt source) leaves it untouched.

The swap. Locally the two folders are exchanged in one atomic rename (Linux renameat2
RENAME_EXCHANGE); where that is not supported, the old folder is renamed aside and the new one
renamed in, two renames microseconds apart. On S3, where nothing renames, the staged objects are
copied over the export's server-side, weights and tokenizer first and config.json last: a
reader in that window gets a sha256 mismatch from load_checkpoint (config.json vouches for the
other two files), never a silent mix. Leftover staging folders of a killed export are deleted by
the next one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import uuid

import pyarrow.fs as pafs
import ray.train

from model.checkpoint import CONFIG, FILES, CheckpointError
from pipeline import storage
from pipeline.training.config import TrainError
from pipeline.training.state import MODEL_DIR, read_phase, uri_of

STAGING = ".staging-"


def export_checkpoint(checkpoint: ray.train.Checkpoint | None, dest: str) -> str:
    """Replace dest by the final checkpoint's `model/` folder (the self-contained model
    checkpoint), as the module docstring describes; print and return dest."""
    if checkpoint is None:
        raise TrainError("the run reported no checkpoint to export")
    if read_phase(checkpoint) != "done":
        raise TrainError(f"latest checkpoint {uri_of(checkpoint)} is not the finished run's")
    remove_staging(dest)
    staging = f"{dest.rstrip('/')}{STAGING}{uuid.uuid4().hex[:12]}"
    dst_fs, dst = storage.filesystem(staging)
    try:
        dst_fs.create_dir(dst, recursive=True)
        pafs.copy_files(f"{checkpoint.path}/{MODEL_DIR}", dst, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=dst_fs)  # fmt: skip
        storage.open_checkpoint(staging)  # verify the copy before it replaces anything
    except CheckpointError as e:
        storage.delete_dir(staging)
        raise TrainError(f"the export of {uri_of(checkpoint)} is unusable ({e}); {dest} is unchanged") from e
    except Exception as e:  # noqa: BLE001  (a full disk, permissions, S3: one message naming the path)
        storage.delete_dir(staging)
        raise TrainError(f"cannot write the export to {staging}: {storage.describe(e)}; {dest} is unchanged") from e
    if storage.is_s3(dest):
        _replace_s3(staging, dest)
    else:
        _replace_local(storage.filesystem(staging)[1], storage.filesystem(dest)[1])
    print(f"exported checkpoint: {dest}")
    return dest


def remove_staging(dest: str) -> None:
    """Delete the staging folders (and set-aside old exports) that killed exports left beside dest."""
    parent, name = posixpath.split(dest.rstrip("/")) if storage.is_s3(dest) else os.path.split(dest.rstrip("/"))
    fs, path = storage.filesystem(parent)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.Directory and posixpath.basename(info.path).startswith(name + STAGING):
            fs.delete_dir(info.path)


def _replace_local(staging: str, dest: str) -> None:
    """Swap staging in as dest; the old export ends at the staging path and is deleted."""
    if not os.path.exists(dest):
        os.rename(staging, dest)  # atomic: no reader could have seen a half-made dest
        return
    if not _exchange(staging, dest):  # two renames: dest is missing for the moment between them
        aside = f"{dest}{STAGING}old-{uuid.uuid4().hex[:12]}"
        os.rename(dest, aside)
        os.rename(staging, dest)
        staging = aside
    storage.delete_dir(staging)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), b)


def _replace_s3(staging: str, dest: str) -> None:
    """Server-side copies over dest, config.json last (module docstring), then the staging deleted."""
    fs, _ = storage.filesystem(dest)
    for name in sorted(FILES, key=lambda n: n == CONFIG):
        src, dst = storage.join(staging, name), storage.join(dest, name)
        try:
            fs.copy_file(storage.filesystem(src)[1], storage.filesystem(dst)[1])
        except Exception as e:  # noqa: BLE001  (botocore, s3fs: one message naming the object)
            raise TrainError(f"copy {src} to {dst}: {storage.describe(e)} (check the bucket, your AWS "
                             "credentials and AWS_ENDPOINT_URL); run the same command again to export") from e  # fmt: skip
    storage.delete_dir(staging)

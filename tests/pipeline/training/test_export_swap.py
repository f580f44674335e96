"""pipeline/training/export.py: the run's export is replaced whole, locally and on S3 (moto): the new
one is verified before it replaces the old, a failed export leaves the old one readable, and no
staging folder stays behind."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.train

from model.checkpoint import save_checkpoint
from pipeline import storage
from pipeline.training.config import TrainError
from pipeline.training.export import export_checkpoint

from builders import scrambled_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def final_checkpoint(root: Path, seed: int, where: str) -> ray.train.Checkpoint:
    """A finished run's checkpoint folder (model/ + train_state.json in phase "done"), under
    `where` (a local folder or an s3:// prefix)."""
    local = (root / "staged" if storage.is_s3(where) else Path(where)) / f"final-{seed}"
    model, tok = scrambled_tiny(["a print of a ship at sea", "an etching of a windmill"], seed=seed)
    save_checkpoint(local / "model", model, tok)
    (local / "train_state.json").write_text(json.dumps({"state": {"phase": "done"}}))
    fs, path = storage.filesystem(storage.join(where, f"final-{seed}"))
    if storage.is_s3(where):
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return ray.train.Checkpoint(path, filesystem=fs)


def siblings(dest: str) -> list[str]:
    parent = dest.rsplit("/", 1)[0]
    fs, path = storage.filesystem(parent)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_export_is_replaced_whole_and_a_failed_one_leaves_the_old(where: str, tmp_path: Path, s3_server) -> None:
    run = str(tmp_path / "run") if where == "local" else f"s3://inkseed-test/export-swap/{tmp_path.name}"
    dest = storage.join(run, "export")
    first, second = final_checkpoint(tmp_path, 1, run), final_checkpoint(tmp_path, 2, run)
    assert export_checkpoint(first, dest) == dest
    digest_1 = storage.open_checkpoint(dest).digest
    export_checkpoint(second, dest)
    digest_2 = storage.open_checkpoint(dest).digest
    assert digest_2 != digest_1
    assert siblings(dest) == ["export", "final-1", "final-2"], "no staging folder is left"

    broken = final_checkpoint(tmp_path, 3, run)
    weights = f"{broken.path}/model/model.safetensors"
    with broken.filesystem.open_input_stream(weights) as f:
        head = f.read(2000)
    with broken.filesystem.open_output_stream(weights) as f:
        f.write(head)  # truncated: the staged copy fails its verification
    with pytest.raises(TrainError, match=rf"the export of .*final-3 is unusable \(.*model.safetensors: truncated .*; {dest} is unchanged"):
        export_checkpoint(broken, dest)
    assert storage.open_checkpoint(dest).digest == digest_2, "the old export is still whole"
    assert siblings(dest) == ["export", "final-1", "final-2", "final-3"]


def test_a_staging_folder_left_by_a_killed_export_is_removed(tmp_path: Path) -> None:
    dest = str(tmp_path / "run" / "export")
    (tmp_path / "run" / "export.staging-0123456789ab").mkdir(parents=True)
    (tmp_path / "run" / "export.staging-0123456789ab" / "config.json").write_text("{}")
    export_checkpoint(final_checkpoint(tmp_path, 1, str(tmp_path / "run")), dest)
    assert siblings(dest) == ["export", "final-1"]

"""jobs.export --format onnx on the tiny model: the job's own 64-seed parity check, the exported
sampler against generate() in other batch sizes, and that sampler running in a fresh Python where
torch cannot be imported."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from jobs import export as export_job
from model.checkpoint import CheckpointError, save_checkpoint
from model.onnx_sampler import META, OnnxSampler
from model.sampling import generate

from builders import scrambled_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAPTIONS = [
    "a print of a ship at sea, at night", "an etching of a windmill among the hills, with three birds",
    "a lighthouse on the right: under the sun, at dusk", "a cottage in the town (in the center)",
]  # fmt: skip
GRAPHS = {"prior_denoiser", "image_decoder", "caption_start", "caption_step", "image_encoder", "caption_encoder"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_torch_thread):
    """A scrambled tiny model saved as a checkpoint and exported by the job (in this process):
    (model, tokenizer, export folder, the job's result, what it printed)."""
    model, tok = scrambled_tiny(CAPTIONS)
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "checkpoint", model, tok)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        meta = export_job.main(export_job.parse_args(
            ["--checkpoint", str(root / "checkpoint"), "--format", "onnx", "--out", str(root / "onnx")]
        ))  # fmt: skip
    return model, tok, root / "onnx", meta, printed.getvalue()


def test_the_export_checks_its_parity_on_64_seeds_and_prints_it(exported) -> None:
    _, _, out, meta, printed = exported
    parity = meta["parity"]
    print(printed)  # the measured numbers, in pytest -s / the report
    assert parity["seeds"] == 64 and parity["captions_equal"] == 64, parity
    assert parity["max_pixel_diff"] <= 2 and parity["ok"], parity
    assert "ONNX parity on 64 seeds" in printed and printed.count(": OK") == 1
    assert json.loads((out / META).read_text())["parity"] == parity
    assert set(meta["graphs"]) == GRAPHS and all((out / f"{g}.onnx").is_file() for g in GRAPHS)
    # The decoder takes z alone: a seed's noise is z_dim numbers, all of them the prior's x_T.
    decoder_inputs = [i.name for i in ort.InferenceSession(str(out / "image_decoder.onnx")).get_inputs()]
    assert decoder_inputs == ["z"]


def test_the_sampler_matches_generate_in_other_batch_sizes(exported) -> None:
    """The graphs were traced at batch 2 and checked at 64: batches of 1 and 3 give the same."""
    model, tok, out, _, _ = exported
    seeds = [3, 17, 40, 1000]
    ref = generate(model, tok, seeds, device="cpu", autocast=False)
    assert len(set(ref.captions)) >= 3, ref.captions  # the seeds differ, so equality means something
    sampler = OnnxSampler(out, threads=1)
    for batch_size in (1, 3):
        got = sampler.generate(seeds, batch_size=batch_size)
        assert got.captions == ref.captions
        assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 2
        np.testing.assert_allclose(got.alignment, ref.alignment, atol=2e-3)


def test_the_exported_sampler_runs_without_torch(exported) -> None:
    _, _, out, _, _ = exported
    code = (
        "import sys; sys.modules['torch'] = sys.modules['model'] = None; "  # both unimportable
        f"sys.path.insert(0, {str(out)!r}); import onnx_sampler; "
        f"onnx_sampler.main([{str(out)!r}, '--seed', '3', '17', '--out', {str(out / 'png')!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ref = OnnxSampler(out, threads=1).generate([3, 17])
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == ref.captions
    assert sorted(p.name for p in (out / "png").iterdir()) == ["17.png", "3.png"]


def test_the_sampler_refuses_an_export_whose_decoder_takes_more_than_z(exported, tmp_path) -> None:
    """An older export (its decoder also took a noise input) is named, not sampled wrongly."""
    import shutil

    import torch

    from model.onnx_export import _export_graph, _Graph

    class TwoInputs(torch.nn.Module):
        def forward(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return z[:, :1, None] * noise[:, None, :1]

    old = tmp_path / "old"
    shutil.copytree(exported[2], old)
    _export_graph(_Graph(TwoInputs(), (torch.zeros(2, 4), torch.zeros(2, 3)), ["z", "noise"], ["image"]),
                  old / "image_decoder.onnx", 17)  # fmt: skip
    with pytest.raises(ValueError, match=r"its image decoder takes \['z', 'noise'\], this sampler feeds z alone"):
        OnnxSampler(old, threads=1)


def test_bad_flags_and_checkpoints_are_named(tmp_path) -> None:
    with pytest.raises(export_job.ExportError, match="--out s3://b/x: the export is written to a local folder"):
        export_job.main(export_job.parse_args(["--out", "s3://b/x"]))
    with pytest.raises(export_job.ExportError, match="--opset 12"):
        export_job.main(export_job.parse_args(["--opset", "12"]))
    with pytest.raises(CheckpointError, match="does not exist"):
        export_job.main(export_job.parse_args(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]))

"""jobs.sample on the embedded checkpoint: a seed's PNG bytes, caption and alignment equal its row
of a real jobs.generate run; captions of held-out engravings name their scene; illustrations and
interpolation strips are what they say; bad flags and files get a clear error."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import sample
from model.images import png_bytes
from pipeline.data.engrave import make_sample
from pipeline.data.grammar import parse_caption

REPO = Path(__file__).resolve().parents[2]
HELD_OUT_SEED = 424242  # a dataset seed the checkpoint never trained on (it saw seed 0)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_seeds_equal_their_generation_manifest_rows(default_run, run_sample, tmp_path):
    out, rows = default_run
    seeds = [0, 5, 65]  # 65 was in jobs.generate's short last batch
    result = run_sample(*[a for s in seeds for a in ("--seed", str(s))], "--out", str(tmp_path))
    assert result["mode"] == "generate" and result["model_digest"] == rows[0]["model_digest"]
    assert [s["seed"] for s in result["samples"]] == seeds
    for s in result["samples"]:
        row = rows[s["seed"]]
        assert s["image_path"] == str(tmp_path / f"{s['seed']}.png")
        assert sha256_file(s["image_path"]) == s["image_sha256"] == row["image_sha256"]
        assert Path(s["image_path"]).read_bytes() == (out / row["image_path"]).read_bytes()
        assert s["caption"] == row["caption"]
        assert np.float32(s["alignment"]) == np.float32(row["alignment"])
        assert (s["width"], s["height"]) == (row["width"], row["height"]) == (128, 128)


@pytest.mark.slow  # the real command in a subprocess (jobs.sample's main runs in-process in the other tests)
def test_text_output_and_the_command_line(default_run, tmp_path):
    """The real command, text output: one line per seed with its alignment and PNG, then its caption."""
    _, rows = default_run
    done = subprocess.run(
        [sys.executable, "-m", "jobs.sample", "--seed", "3", "--seed", "4", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == f"seed 3  alignment {rows[3]['alignment']:.3f}  {tmp_path / '3.png'}"
    assert lines[1] == f"  {rows[3]['caption']}" and lines[3] == f"  {rows[4]['caption']}"
    assert sha256_file(tmp_path / "4.png") == rows[4]["image_sha256"]


def test_captions_of_held_out_engravings_name_their_scene(run_sample, tmp_path):
    paths, truths = [], []
    for i in range(3):
        attrs, _, image = make_sample(HELD_OUT_SEED, i, 128)
        paths.append(tmp_path / f"held-out-{i}.png")
        paths[-1].write_bytes(png_bytes(image))
        truths.append(attrs)
    # The same engraving as a larger RGB JPEG-free file: read in grayscale and resized.
    Image.open(paths[0]).convert("RGB").resize((256, 256)).save(tmp_path / "big.png")
    result = run_sample("--caption-image", *map(str, paths), str(tmp_path / "big.png"))
    assert result["mode"] == "caption"
    assert [s["image"] for s in result["samples"]] == [str(p) for p in paths] + [str(tmp_path / "big.png")]
    parsed = [parse_caption(s["caption"]) for s in result["samples"]]
    assert parsed[:3] == truths  # i2t reads every attribute of held-out engravings (README: 1.000)
    assert parsed[3]["subject"] == truths[0]["subject"]


def test_illustrate_draws_the_caption_and_the_seed_picks_the_rest(run_sample, tmp_path):
    text = "an engraving of a ship at sea, in the middle, under the clouds, by day"
    result = run_sample("--illustrate", text, "--seed", "1", "--seed", "2", "--out", str(tmp_path))
    assert result["mode"] == "illustrate" and [s["seed"] for s in result["samples"]] == [1, 2]
    files = [tmp_path / "illustrate-1.png", tmp_path / "illustrate-2.png"]
    assert [sha256_file(f) for f in files] == [s["image_sha256"] for s in result["samples"]]
    assert files[0].read_bytes() != files[1].read_bytes()
    assert all(s["caption"] == text and s["alignment"] > 0.5 for s in result["samples"])
    read_back = run_sample("--caption-image", *map(str, files))["samples"]
    assert all(parse_caption(r["caption"])["subject"] == "ship" for r in read_back)
    again = run_sample("--illustrate", text, "--seed", "2", "--out", str(tmp_path / "again"))
    assert again["samples"][0]["image_sha256"] == result["samples"][1]["image_sha256"]


def test_interpolate_writes_a_strip_whose_ends_are_the_seeds(default_run, run_sample, tmp_path):
    _, rows = default_run
    result = run_sample("--interpolate", "3", "9", "--steps", "5", "--out", str(tmp_path))
    path = tmp_path / "interpolate-3-9.png"
    assert result["image_path"] == str(path) and sha256_file(path) == result["image_sha256"]
    strip = np.asarray(Image.open(path))
    assert strip.shape == (128, 5 * 128 + 4 * sample.STRIP_GUTTER) == (result["height"], result["width"])
    assert (strip[:, 128 : 128 + sample.STRIP_GUTTER] == 255).all()
    frames = result["frames"]
    assert [f["t"] for f in frames] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert frames[0]["caption"] == rows[3]["caption"] and frames[-1]["caption"] == rows[9]["caption"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to do"),
        (["--seed", "1", "--caption-image", "a.png"], "--seed does not apply to --caption-image"),
        (["--illustrate", "a ship"], "--illustrate needs --seed"),
        (["--illustrate", "a ship", "--interpolate", "1", "2"], "give one of"),
        (["--interpolate", "1", "2", "--steps", "1"], "--steps must be >= 2"),
        (["--seed", "-3"], "seeds must be >= 0"),
        (["--seed", "1", "--beams", "0"], "--beams must be >= 1"),
        (["--seed", "1", "--checkpoint", "no/such/ckpt"], "--checkpoint 'no/such/ckpt'"),
        (["--caption-image", "no/such.png"], "--caption-image 'no/such.png': not a readable image"),
    ],
)
def test_bad_flags_and_files_are_named(argv, message):
    cfg = sample.parse_args(argv) if "--checkpoint" in argv else sample.parse_args(
        [*argv, "--checkpoint", str(REPO / "checkpoints" / "default")])  # fmt: skip
    with pytest.raises(sample.SampleError, match=message.replace("(", r"\(")):
        sample.main(cfg)


@pytest.mark.slow  # the real command in a subprocess (jobs.sample's main runs in-process in the other tests)
def test_the_error_exit_of_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.sample", "--caption-image", str(tmp_path / "x.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("error: --caption-image")
    assert "Traceback" not in done.stderr  # the message alone, not a stack trace

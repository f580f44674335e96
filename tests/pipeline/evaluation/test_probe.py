"""pipeline/evaluation/probe.py: the attribute probe learns to read real engravings (held-out accuracy),
its cache round-trips and is keyed by dataset and settings, and bad input is refused.

Training data come straight from the renderer (pipeline.data.engrave.make_sample) at 64 px, so most
tests need no Ray; one test reads a rendered image folder through pipeline/data/ingest.py on local Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipeline.data.engrave import render_dataset
from pipeline.data.grammar import ATTRIBUTES
from pipeline.evaluation.probe import Probe, ProbeConfig, accuracy, blur_some, train_probe
from pipeline.evaluation.probe_cache import dataset_fingerprint, get_probe, load_probe, probe_key, save_probe
from pipeline.evaluation.real import RealSet, grammar_attributes, load_real

from builders import rendered_set

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Small and quick: ~2,600 image-steps at 64 px; enough for >= 90% per attribute on held-out plates.
FAST = ProbeConfig(image_size=SIZE, epochs=3, batch_size=32, min_steps=80, seed=0)


def rendered(start: int, count: int) -> RealSet:
    return rendered_set(7, start, count, SIZE)


@pytest.fixture(scope="module")
def probe() -> Probe:
    return train_probe(rendered(0, 512), rendered(10_000, 200), FAST, log=lambda _: None)


def test_probe_reads_held_out_real_images(probe: Probe) -> None:
    assert probe.val_size == 200 and probe.train_size == 512
    assert probe.epochs >= FAST.epochs and probe.train_seconds > 0
    for name in ATTRIBUTES:
        assert probe.accuracy[name] >= 0.9, (name, probe.accuracy)
    assert probe.accuracy["all"] >= 0.8, probe.accuracy
    # The reported accuracy is what read() gives on those images.
    val = rendered(10_000, 200)
    read, feats = probe.read(val.images)
    assert accuracy(read, val.attributes) == probe.accuracy
    assert feats.shape == (200, FAST.feature_dim) and np.isfinite(feats).all()
    assert all(set(r) == set(ATTRIBUTES) and all(r[k] in ATTRIBUTES[k] for k in r) for r in read)


def test_probe_reads_softened_images(probe: Probe) -> None:
    """Trained with some blurred plates, it still reads a slightly soft image (as a decoder may
    make): coherence then measures content, and sharpness is left to the Fréchet distance."""
    val = rendered(10_000, 200)
    soft = np.stack(
        [np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(0.8))) for i in val.images]
    )
    read, _ = probe.read(soft)
    got = accuracy(read, val.attributes)
    assert min(got[k] for k in ATTRIBUTES) >= 0.8, got


def test_blur_some_blurs_the_chosen_share() -> None:
    x = torch.zeros(64, SIZE, SIZE)
    x[:, 32, 32] = 255.0
    gen = torch.Generator().manual_seed(0)
    y = blur_some(x, replace(FAST, blur_share=0.5), gen)
    assert torch.allclose(y.sum((1, 2)), x.sum((1, 2)), rtol=1e-4)  # blurring keeps the ink
    blurred = (y[:, 32, 32] < 255).float().mean()
    assert 0.25 < blurred < 0.75
    one = blur_some(x[:1], replace(FAST, blur_share=1.0, blur_sigma=(0.8, 0.8)), gen)
    assert one[0, 32, 32] == pytest.approx(255 / (2 * np.pi * 0.8**2), rel=0.05)  # Gaussian peak


def test_probe_cannot_be_fooled_by_noise(probe: Probe) -> None:
    """Random images are not read as any one scene: the readings spread over the values."""
    noise = np.random.default_rng(0).integers(0, 256, (64, SIZE, SIZE), dtype=np.uint8)
    read, _ = probe.read(noise)
    val = rendered(10_000, 64)
    assert accuracy(read, val.attributes)["all"] < 0.1


def test_cache_round_trip(probe: Probe, tmp_path: Path) -> None:
    probe = replace(probe, key="k" * 20)
    weights = save_probe(probe, str(tmp_path))
    assert Path(weights).is_file() and Path(weights).with_suffix(".json").is_file()
    again = load_probe(str(tmp_path), FAST, probe.key)
    assert again is not None and again.cached and again.accuracy == probe.accuracy
    images = rendered(20_000, 16).images
    assert np.array_equal(again.read(images)[1], probe.read(images)[1])
    assert load_probe(str(tmp_path), FAST, "x" * 20) is None  # another key: nothing cached
    # Damaged weights are not trusted: the caller retrains.
    Path(weights).write_bytes(Path(weights).read_bytes()[:-8] + b"XXXXXXXX")
    assert load_probe(str(tmp_path), FAST, probe.key) is None


def test_key_follows_dataset_settings_and_size(tmp_path: Path) -> None:
    data = tmp_path / "d"
    render_dataset(str(data), 8, SIZE, 0)
    key = probe_key(str(data), FAST)
    assert key == probe_key(str(data) + "/", FAST)  # same dataset, same key
    assert key != probe_key(str(data), ProbeConfig(image_size=128, epochs=3, batch_size=32, min_steps=80))
    assert key != probe_key(str(data), ProbeConfig(image_size=SIZE, epochs=4, batch_size=32, min_steps=80))
    before = dataset_fingerprint(str(data))
    meta = data / "metadata.jsonl"
    meta.write_text(meta.read_text() + json.dumps({"file_name": "images/000000.png", "text": "x"}) + "\n")
    assert dataset_fingerprint(str(data)) != before and probe_key(str(data), FAST) != key
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset_fingerprint(str(tmp_path / "missing"))


def test_get_probe_trains_once_then_uses_the_cache(ray_local, tmp_path: Path) -> None:
    """Through pipeline.data on a rendered folder: sorted rows, attributes from metadata, cache."""
    data = tmp_path / "eng"
    render_dataset(str(data), 240, SIZE, 3)
    val = load_real(str(data), SIZE, "val")
    assert val.file_names == sorted(val.file_names) and len(val) < 60
    assert val.images.dtype == np.uint8 and val.images.shape[1:] == (SIZE, SIZE)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    by_name = {r["file_name"]: r for r in rows}
    assert all(a == grammar_attributes(by_name[n]) for a, n in zip(val.attributes, val.file_names))
    cfg = ProbeConfig(image_size=SIZE, epochs=1, batch_size=32, min_steps=10)
    first = get_probe(str(data), cfg, cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    second = get_probe(str(data), cfg, cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert not first.cached and second.cached and second.accuracy == first.accuracy
    assert first.val_size == len(val) and first.train_size == 240 - len(val)
    # Default cache: a dot-folder inside the dataset, which the dataset readers skip.
    third = get_probe(str(data), cfg, log=lambda _: None)
    assert Path(third.source).parent == data / ".probe"


def test_bad_input_is_refused(probe: Probe) -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        probe.read(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8 images"):
        probe.read(np.zeros((2, SIZE, SIZE), np.float32))
    unlabeled = rendered(0, 100)
    unlabeled.attributes = [None] * 100
    with pytest.raises(ValueError, match="labeled real images"):
        train_probe(unlabeled, unlabeled, FAST)
    assert grammar_attributes({"subject": "ship"}) is None
    assert grammar_attributes({**rendered(0, 1).attributes[0], "birds": 7}) is None
    assert grammar_attributes({**rendered(0, 1).attributes[0], "birds": 2})["birds"] == "2"

"""pipeline/evaluation/freeform.py: the contrastive probe matches held-out free-form captions to
their images far above chance and shuffled ones at chance, is deterministic and round-trips
through safetensors; sharpness and caption health give known answers on hand-built cases.

The dataset is drawn here with PIL, so the right answer is known: one shape (circle, square,
triangle, cross), small or large, outlined or filled, in one of nine places, captioned
"a small filled circle at the top left". 216 distinct captions, so among 32 candidates a pair
has a textual twin (a tie, counted as a miss) about 13% of the time: a perfect probe scores ~0.87.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import load as load_tensors

from pipeline.evaluation.freeform import (
    UNK_ID,
    ContrastiveProbe,
    ContrastiveProbeConfig,
    caption_health,
    encode,
    mean_gradient,
    retrieval_at_k,
    sharpness_ratio,
    train_contrastive_probe,
    words,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE, K = 64, 32
# ~4,000 image-steps: ~5 s on one CPU thread.
FAST = ContrastiveProbeConfig(image_size=SIZE, epochs=1, min_steps=60, batch_size=64, seed=0)
SHAPES, SIZES, STYLES = ("circle", "square", "triangle", "cross"), {"small": 0.09, "large": 0.16}, ("outlined", "filled")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def draw(shape: str, radius: float, filled: bool, cx: float, cy: float) -> np.ndarray:
    im = Image.new("L", (SIZE, SIZE), 235)  # light paper, dark ink
    d, r, ink = ImageDraw.Draw(im), radius * SIZE, 20
    fill = ink if filled else None
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ink, fill=fill, width=2)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], outline=ink, fill=fill, width=2)
    else:
        t = r / 3
        arm = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        pts = [(0, -r), (-r, r), (r, r)] if shape == "triangle" else arm
        d.polygon([(cx + x, cy + y) for x, y in pts], outline=ink, fill=fill, width=2)
    return np.asarray(im)


def shapes(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n images (n, 64, 64) uint8 and their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        shape, size, style = SHAPES[rng.integers(4)], list(SIZES)[rng.integers(2)], STYLES[rng.integers(2)]
        row, col = rng.integers(3), rng.integers(3)
        cx, cy = ((col + 0.5 + rng.uniform(-0.12, 0.12)) * SIZE / 3, (row + 0.5 + rng.uniform(-0.12, 0.12)) * SIZE / 3)
        images.append(draw(shape, SIZES[size], style == "filled", cx, cy))
        place = " ".join(p for p in (ROWS[row], COLS[col]) if p not in ("middle", "center")) or "center"
        captions.append(f"a {size} {style} {shape} at the {place}")
    return np.stack(images), captions


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, list[str]]]:
    return {"train": shapes(600, seed=0), "held_out": shapes(400, seed=1)}


@pytest.fixture(scope="module")
def probe(data) -> ContrastiveProbe:
    return train_contrastive_probe(*data["train"], FAST, log=lambda _: None)


def blurred(images: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


# -- the probe ------------------------------------------------------------------------------------
def test_probe_matches_held_out_pairs_far_above_chance(probe, data) -> None:
    images, captions = data["held_out"]
    i2c = retrieval_at_k(probe, images, captions, k=K)
    c2i = retrieval_at_k(probe, images, captions, k=K, direction="caption_to_image")
    # Measured 0.745 / 0.865 (chance 1/32 = 0.031; a perfect probe ~0.87 image->caption).
    assert i2c >= 0.5 and c2i >= 0.5, (i2c, c2i)
    assert probe.info["steps"] >= FAST.min_steps and probe.info["train_size"] == 600
    # Mild blur (within the training augmentation) still reads.
    assert retrieval_at_k(probe, blurred(images, 0.6), captions, k=K) >= 0.8 * i2c


def test_shuffled_captions_score_at_chance(probe, data) -> None:
    images, captions = data["held_out"]
    perm = np.roll(np.arange(len(captions)), 1)  # every image gets its neighbour's caption
    shuffled = retrieval_at_k(probe, images, [captions[j] for j in perm], k=K)
    assert shuffled <= 0.1, shuffled  # chance 0.031, +-0.009 sd at 400 pairs


def test_real_halves_give_the_same_coherence(probe, data) -> None:
    images, captions = data["held_out"]
    ceiling = retrieval_at_k(probe, images, captions, k=K)
    # The same pairs as "generated": the same computation, the same number, ratio exactly 1.
    assert retrieval_at_k(probe, images.copy(), list(captions), k=K) / ceiling == 1.0
    a = retrieval_at_k(probe, images[:200], captions[:200], k=K)
    b = retrieval_at_k(probe, images[200:], captions[200:], k=K)
    assert 0.8 <= a / b <= 1.25, (a, b)


def test_ties_count_as_misses(probe, data) -> None:
    images, captions = data["held_out"]
    # One caption for every image: every rival is the same bag of words, so nothing is ranked first.
    assert retrieval_at_k(probe, images[:40], [captions[0]] * 40, k=8) == 0.0
    # One image for every caption: the same in the other direction.
    same = np.repeat(images[:1], 40, axis=0)
    assert retrieval_at_k(probe, same, captions[:40], k=8, direction="caption_to_image") == 0.0
    with pytest.raises(ValueError):
        retrieval_at_k(probe, images[:10], captions[:10], k=K)  # fewer pairs than candidates
    with pytest.raises(ValueError):
        retrieval_at_k(probe, images[:40], captions[:40], k=8, direction="sideways")  # type: ignore[arg-type]


def test_embeddings_and_features(probe, data) -> None:
    images, captions = data["held_out"]
    feats, emb, cap = probe.image_features(images[:50]), probe.image_embed(images[:50]), probe.caption_embed(captions[:50])
    assert feats.shape == (50, FAST.feature_dim) and feats.dtype == np.float32
    assert emb.shape == cap.shape == (50, FAST.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cap, axis=1), 1.0, atol=1e-5)
    # Batching does not change a feature (GroupNorm: nothing depends on the batch).
    np.testing.assert_allclose(probe.image_features(images[:50], batch_size=7), feats, atol=1e-5)
    with pytest.raises(ValueError):
        probe.image_features(images[:5].astype(np.float32))
    with pytest.raises(ValueError):
        probe.image_features(np.zeros((5, 128, 128), np.uint8))


def test_vocabulary_is_its_own(probe, data) -> None:
    train_words = {w for c in data["train"][1] for w in words(c)}
    assert {w for w in probe.vocab if " " not in w and not w.startswith("<")} == train_words
    ids = encode(["a gnome at the top", ""], probe.vocab, FAST.max_words)
    assert ids[0, 1] == UNK_ID and ids[0, 0] == probe.vocab["a"]  # "gnome" was never in a train caption
    assert ids[1, 0] == UNK_ID  # an empty caption is one UNK
    assert words("A T-shirt, piñata_2!") == ["a", "t", "shirt", "piñata", "2"]


def test_same_seed_same_weights_other_seed_other_weights(data) -> None:
    images, captions = data["train"][0][:96], data["train"][1][:96]
    tiny = replace(FAST, batch_size=32, min_steps=6)
    a, b = (train_contrastive_probe(images, captions, tiny, log=lambda _: None) for _ in range(2))
    c = train_contrastive_probe(images, captions, replace(tiny, seed=1), log=lambda _: None)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not all(torch.equal(t, c.state_dict()[n]) for n, t in a.state_dict().items())
    assert np.array_equal(a.image_embed(images), b.image_embed(images))
    assert np.array_equal(a.caption_embed(captions), b.caption_embed(captions))


def test_files_round_trip_without_pickle(probe, data) -> None:
    images, captions = data["held_out"]
    files = probe.to_files()
    assert set(files) == {"probe.safetensors", "probe.json"}
    blob = files["probe.safetensors"]
    (header_len,) = struct.unpack("<Q", blob[:8])  # the safetensors layout: u64 length, JSON header
    assert set(json.loads(blob[8 : 8 + header_len])) - {"__metadata__"} == set(probe.state_dict())
    assert set(load_tensors(blob)) == set(probe.state_dict())
    doc = json.loads(files["probe.json"])
    assert doc["vocab"] == probe.vocab and doc["config"]["seed"] == FAST.seed
    back = ContrastiveProbe.from_files(files)
    assert back.config == FAST and back.vocab == probe.vocab and back.info == probe.info
    assert np.array_equal(back.image_embed(images), probe.image_embed(images))
    assert np.array_equal(back.image_features(images), probe.image_features(images))
    assert np.array_equal(back.caption_embed(captions), probe.caption_embed(captions))
    damaged = dict(files, **{"probe.safetensors": blob[:-4] + b"\0\0\0\0"})
    with pytest.raises(ValueError, match="sha256"):
        ContrastiveProbe.from_files(damaged)


# -- sharpness ------------------------------------------------------------------------------------
def test_mean_gradient_known_values() -> None:
    stripes = np.zeros((1, 4, 4), np.uint8)
    stripes[:, :, 1::2] = 255  # x: every step is 1; y: none
    assert mean_gradient(stripes) == pytest.approx(0.5)
    assert mean_gradient(np.full((2, 8, 8), 0.3)) == 0.0


def test_blur_lowers_the_sharpness_ratio(data) -> None:
    images = data["held_out"][0]
    assert 0.9 <= sharpness_ratio(images[:200], images[200:]) <= 1.1
    assert sharpness_ratio(blurred(images[:200], 1.5), images[200:]) <= 0.7
    assert sharpness_ratio(blurred(images[:200], 1.5), images[200:]) < sharpness_ratio(blurred(images[:200], 0.7), images[200:])


# -- caption health -------------------------------------------------------------------------------
def test_repeated_ngrams() -> None:
    gen = ["gnome mime mime mime application", "a small circle at the top left", "a cat and a cat", "a b c a d"]
    # "mime mime" (repeated word) and "a cat ... a cat" (repeated bigram) count; "a ... a" alone does not.
    assert caption_health(gen, ["x"])["repeated_ngram_share"] == 0.5
    assert caption_health(["a small circle at the top left"], ["x"])["repeated_ngram_share"] == 0.0


def test_distinct_novel_and_known_vocabulary() -> None:
    train = ["A small circle.", "a large square at the top"]
    gen = ["a small  circle", "A Small Circle", "a large square", "purple gnome"]
    h = caption_health(gen, train)
    assert h["distinct_share"] == 0.75  # the first two are one caption up to case and spacing
    assert h["novel_share"] == 0.5  # both of them are a train caption
    assert h["vocab_known_share"] == 9 / 11  # of 11 words, "purple" and "gnome" are unknown
    assert h["mean_words"] == 11 / 4
    assert caption_health([""], train)["vocab_known_share"] == 0.0

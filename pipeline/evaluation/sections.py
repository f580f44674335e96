"""The report sections of `jobs.evaluate`: the grammar family (coherence, coverage, conditional
accuracy), the free-form family (retrieval, realism, caption health) and what every dataset gets
(alignment, determinism). Each takes the model or its outputs and returns JSON-able dicts."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from model.checkpoint import Inkseed
from pipeline.data.grammar import parse_caption
from pipeline.evaluation.batched import Generated, alignment_batched, caption_batched, illustrate_batched
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.freeform import (
    ContrastiveProbe,
    caption_health,
    mean_gradient,
    retrieval_at_k,
    sharpness_ratio,
)
from pipeline.evaluation.metrics import (
    auc,
    chance_coherence,
    coherence,
    coverage,
    derangement,
    distribution,
    frechet_distance,
)
from pipeline.evaluation.probe import Probe, accuracy
from pipeline.evaluation.real import RealSet


def alignment_section(
    ink: Inkseed,
    images: np.ndarray,
    captions: Sequence[str],
    scores: np.ndarray | None,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Score distribution of the pairs and the AUC of true pairs against shuffled pairs."""
    if scores is None:
        scores = alignment_batched(ink, images, captions, batch_size)
    perm = derangement(len(captions), np.random.default_rng(seed))
    shuffled = alignment_batched(ink, images, [captions[j] for j in perm], batch_size)
    return {
        "n": len(captions),
        "true_pairs": distribution(scores),
        "shuffled_pairs": distribution(shuffled),
        "auc": auc(scores, shuffled),
    }


def determinism_section(ink: Inkseed, gen: Generated, count: int, batch_size: int) -> dict[str, Any]:
    """Re-generate `count` seeds of the run alone (batch of 1) and inside one mixed batch of a
    different size (shuffled among seeds outside the range); compare with the run's own outputs."""
    picks = np.unique(np.linspace(0, len(gen.seeds) - 1, min(count, len(gen.seeds))).round().astype(int))
    seeds = [gen.seeds[i] for i in picks]
    fillers = [max(gen.seeds) + 1 + j for j in range(len(seeds) + 1)]
    mixed = seeds + fillers
    if len(mixed) == batch_size:  # must differ from the run's batch size
        mixed.append(max(fillers) + 1)
    random.Random(0).shuffle(mixed)
    batch = ink.generate(mixed)
    where = {s: k for k, s in enumerate(mixed)}
    mismatched, max_diff = set(), 0
    for i, s in zip(picks, seeds):
        alone = ink.generate([s])
        variants = [(alone.images[0], alone.captions[0]), (batch.images[where[s]], batch.captions[where[s]])]
        for image, caption in variants:
            diff = int(np.abs(image.astype(np.int16) - gen.images[i].astype(np.int16)).max())
            max_diff = max(max_diff, diff)
            if caption != gen.captions[i] or diff > 1:
                mismatched.add(s)
    return {
        "mismatches": len(mismatched),
        "seeds_checked": len(seeds),
        "mismatched_seeds": sorted(mismatched),
        "batch_sizes": sorted({1, len(mixed), min(batch_size, len(gen.seeds))}),
        "max_pixel_diff": max_diff,
        "rule": "same caption, and every pixel within 1/255",
    }


def coherence_section(
    gen_read: Sequence[dict[str, str]],
    gen_parsed: Sequence[dict[str, str] | None],
    real_read: Sequence[dict[str, str]],
    real_captions: Sequence[str],
    names: Sequence[str],
) -> dict[str, Any]:
    """Coherence of the generated pairs, its ceiling on real held-out pairs (same probe, same
    parser) and its chance level (independent image readings and captions)."""
    out: dict[str, Any] = {
        **coherence(gen_read, gen_parsed, names),
        "ceiling": coherence(real_read, [parse_caption(c) for c in real_captions], names),
        "n": len(gen_read),
        "ceiling_n": len(real_read),
    }
    weakest = min(names, key=lambda k: out[k])
    out["weakest"], out["weakest_attribute"] = out[weakest], weakest
    valid = [p for p in gen_parsed if p is not None]
    if valid:
        out["chance"] = chance_coherence(gen_read, valid, names)
    return out


def _held_out_halves(n_real: int, n_seeds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets of the held-out rows, each of size min(N, n_real // 2)."""
    n = min(n_seeds, n_real // 2)
    order = np.random.default_rng(seed).permutation(n_real)
    return order[:n], order[n : 2 * n]


def fidelity_section(gen_feats: np.ndarray, real_feats: np.ndarray, seed: int) -> dict[str, Any]:
    """Fréchet distance of n generated vs n held-out real features, and of n other held-out vs
    the same n (the floor); n = min(N, held-out // 2), so both distances share one size's bias."""
    a, b = _held_out_halves(len(real_feats), len(gen_feats), seed)
    n = len(a)
    if n < 2:
        return {
            "skipped": f"the held-out split has {len(real_feats)} labeled images; the floor needs 2 sets of >= 2"
        }
    fd, floor = frechet_distance(gen_feats[:n], real_feats[a]), frechet_distance(real_feats[b], real_feats[a])
    out = {"frechet": fd, "floor": floor, "ratio": fd / floor if floor > 0 else math.inf, "n": n}
    if n < len(gen_feats):
        out["note"] = (
            f"the held-out split has {len(real_feats)} images, so each set has n={n} (< N={len(gen_feats)}): "
            "generated[:n] vs held-out A, and held-out B vs A"
        )
    return out


def coverage_section(
    gen_parsed: Sequence[dict[str, str] | None],
    gen_read: Sequence[dict[str, str]],
    val: RealSet,
    names: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    a, b = _held_out_halves(len(val), len(gen_parsed), seed)
    n = len(a)
    ref = [val.attributes[i] for i in a]
    other = [val.attributes[i] for i in b]
    captions, images, ceiling = (
        coverage(ref, gen_parsed[:n], names),
        coverage(ref, gen_read[:n], names),
        coverage(ref, other, names),
    )
    out = {
        "combos": captions["combos"],
        "combos_ceiling": ceiling["combos"],
        "combos_ratio": captions["combos"] / ceiling["combos"] if ceiling["combos"] else None,
        "pairs": captions["pairs"],
        "pairs_ceiling": ceiling["pairs"],
        "combos_images": images["combos"],
        "pairs_images": images["pairs"],
        "reference_combos": captions["reference_combos"],
        "n": n,
        "how": "combinations of n held-out real samples found among the parsed captions of n generated samples "
        "(*_images: among the probe readings of their images); ceiling: among n other held-out real samples",
    }
    if n < len(gen_parsed):
        out["note"] = f"the held-out split has {len(val)} labeled images, so n={n} < N={len(gen_parsed)}"
    return out


def conditional_section(
    ink: Inkseed,
    probe: Probe,
    val: RealSet,
    names: Sequence[str],
    count: int,
    seed_start: int,
    batch_size: int,
) -> dict[str, Any]:
    """Caption held-out images (attribute accuracy of the parsed captions vs the metadata) and
    illustrate held-out captions (probe reading of the images vs the caption's attributes)."""
    rows = val.subset(range(min(count, len(val))))
    truth: list[dict[str, str]] = rows.attributes  # type: ignore[assignment]
    made = caption_batched(ink, rows.images, batch_size)
    parsed = [parse_caption(c) for c in made]
    out: dict[str, Any] = {
        "caption": {
            "accuracy": _accuracy_or_miss(parsed, truth, names),
            "valid_share": float(np.mean([p is not None for p in parsed])),
            "n": len(rows),
            "examples": [{"truth": t, "caption": c} for t, c in zip(rows.captions[:3], made[:3])],
        }
    }
    seeds = list(range(seed_start, seed_start + len(rows)))
    images = illustrate_batched(ink, rows.captions, seeds, batch_size)
    read, _ = probe.read(images)
    agreement = accuracy(read, truth)
    agreement["mean"] = float(np.mean([agreement[k] for k in names]))
    out["illustrate"] = {"agreement": agreement, "n": len(rows), "seeds": [seeds[0], seeds[-1]]}
    return out


def _accuracy_or_miss(
    pred: Sequence[dict[str, str] | None], truth: Sequence[dict[str, str]], names: Sequence[str]
) -> dict[str, float]:
    """Per-attribute and all-at-once accuracy; an unparsed prediction is wrong on every attribute."""
    acc = coherence(truth, pred, names)
    acc["mean"] = float(np.mean([acc[k] for k in names]))
    return acc


def freeform_sections(
    ink: Inkseed, probe: ContrastiveProbe, gen: Generated, val: RealSet, train_captions: Sequence[str],
    cfg: EvaluateConfig,
) -> dict[str, Any]:  # fmt: skip
    """The free-form family, for any dataset: retrieval coherence against its real ceiling,
    Fréchet distance in the contrastive probe's features, sharpness, caption health, and the
    conditional modes scored by retrieval. Every retrieval is among K = cfg.retrieval_k."""
    k, seed = cfg.retrieval_k, cfg.seed_start
    n = min(len(val), len(gen.seeds))
    if n < k:
        reason = f"retrieval among K={k} needs >= {k} generated and held-out pairs, got {len(gen.seeds)} and {len(val)}"
        return {"retrieval": {"skipped": reason}}
    coherence = retrieval_at_k(probe, gen.images, gen.captions, k, seed)
    ceiling = retrieval_at_k(probe, val.images[:n], val.captions[:n], k, seed)
    out: dict[str, Any] = {
        "retrieval": {"coherence": coherence, "ceiling": ceiling, "ratio": coherence / ceiling if ceiling else None,
                      "chance": 1 / k, "k": k, "n": len(gen.seeds), "ceiling_n": n},  # fmt: skip
        "fidelity": fidelity_section(probe.image_features(gen.images), probe.image_features(val.images), seed),
        "realism": {"sharpness_ratio": sharpness_ratio(gen.images, val.images),
                    "generated_gradient": mean_gradient(gen.images), "real_gradient": mean_gradient(val.images)},  # fmt: skip
        # Real captions may repeat a bigram too ("on the hill, on the left"): their share is the reference.
        "captions": {**caption_health(gen.captions, train_captions),
                     "real_repeated_ngram_share": caption_health(val.captions, train_captions)["repeated_ngram_share"]},
    }  # fmt: skip
    m = min(cfg.num_conditional, len(val))
    if m >= k:
        rows, seeds = val.subset(range(m)), list(range(seed, seed + m))
        made = caption_batched(ink, rows.images, cfg.batch_size)
        drawn = illustrate_batched(ink, rows.captions, seeds, cfg.batch_size)
        out["conditional"] = {
            "caption": {"retrieval": retrieval_at_k(probe, rows.images, made, k, seed), "n": m,
                        "examples": [{"truth": t, "caption": c} for t, c in zip(rows.captions[:3], made[:3])]},
            "illustrate": {"retrieval": retrieval_at_k(probe, drawn, rows.captions, k, seed), "n": m},
        }  # fmt: skip
    return out

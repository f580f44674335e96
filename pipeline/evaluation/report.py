"""Quality, measured: the metrics of `jobs.evaluate`, its report.json and its contact sheet.

For N seeds of a checkpoint, against the held-out (val) split of a dataset:

- probe: a CNN trained on real train images reads every attribute (pipeline/probe.py); its
  held-out accuracy says how far its readings can be trusted;
- coherence: share of samples whose probe-read image attributes equal the attributes parsed
  from their own caption, per attribute and all at once; ceiling = the same on real held-out pairs;
- validity: share of generated captions that parse in the grammar;
- diversity: distinct share, and share not copied verbatim from the training captions;
- coverage: share of the attribute combinations of n real samples found among n generated ones,
  next to the same share for n other real samples (the ceiling: with 2,880 scenes and n ~ 1,000
  even real data covers only part of its own combinations); also over attribute-value pairs;
- fidelity: Fréchet distance in probe-feature space, generated vs real, next to real vs real
  (two disjoint held-out sets of the same size: the floor), and their ratio;
- conditional modes: caption held-out images (attribute accuracy of the captions), illustrate
  held-out captions (probe agreement with the caption's attributes);
- determinism: seeds generated alone and inside batches of other sizes must agree;
- alignment: the score's distribution and its AUC, true pairs vs shuffled pairs;
- targets: issue 7's quality targets for the base preset, each with its value and met / missed.

A dataset without the grammar's attributes or captions (any image folder with captions) keeps
what still applies (diversity, alignment, determinism, contact sheet); every other metric is
reported as {"skipped": reason}. Runs in-process: only the dataset read goes through Ray Data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from model.checkpoint import Inkseed
from pipeline import storage
from pipeline.contact_sheet import render_sheet
from pipeline.data.grammar import ATTRIBUTES, parse_caption
from pipeline.evaluation.probe import Probe, ProbeConfig, RealSet, accuracy, get_probe, load_real

Log = Callable[[str], None]
# Below this share of held-out rows with grammar captions / attributes, the grammar metrics are
# skipped: the dataset is not the engraving grammar's, and the numbers would mean nothing.
MIN_SHARE = 0.95
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class EvaluateError(ValueError):
    """Bad input to the evaluation, detected before the work starts."""


@dataclass
class EvaluateConfig:
    """Everything `jobs.evaluate` needs."""

    # Checkpoint directory (local or s3://) as written by save_checkpoint / jobs.train.
    checkpoint: str = "checkpoints/default"
    # Dataset URI (image folder with metadata.jsonl, or Parquet; local or s3://): its val split is
    # the held-out real data, its train split trains the probe and is the "copied verbatim" set.
    data: str = "data/engravings"
    # Output folder (local or s3://): report.json, contact_sheet.png, contact_sheet.html.
    out: str = "eval"
    # N: seeds seed_start .. seed_start + num_seeds - 1 are generated and measured.
    num_seeds: int = 1000
    seed_start: int = 0
    # Seeds per model call; 64 keeps CPU memory small (1,000 seeds at 128 px are only 16 MB).
    batch_size: int = 64
    # Where the model runs; "auto" = CUDA when available.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Probe cache folder; None = <data>/.probe (or beside a single-file dataset).
    probe_cache: str | None = None
    # How the attribute probe is built and trained (pipeline/probe.py); its image_size is
    # replaced by the checkpoint's, so the probe reads images at the size the model makes.
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Held-out pairs used by each conditional mode (caption / illustrate): 500 give +-2% at 90%.
    num_conditional: int = 500
    # Seeds re-generated alone and in a mixed batch for the determinism check.
    determinism_seeds: int = 16
    # Samples on the contact sheet (the first seeds of the range).
    contact_seeds: int = 32

    def validate(self) -> None:
        checks = {
            "num_seeds must be >= 2": self.num_seeds >= 2,
            "seed_start must be >= 0": self.seed_start >= 0,
            "batch_size must be >= 1": self.batch_size >= 1,
            "probe epochs must be >= 1": self.probe.epochs >= 1,
            "num_conditional must be >= 1": self.num_conditional >= 1,
            "determinism_seeds must be >= 1": self.determinism_seeds >= 1,
            "contact_seeds must be >= 1": self.contact_seeds >= 1,
            "device must be auto, cpu or cuda": self.device in ("auto", "cpu", "cuda"),
        }
        for message, ok in checks.items():
            if not ok:
                raise EvaluateError(message)
        if not storage.exists(self.data):
            raise EvaluateError(f"dataset {self.data!r} does not exist")


# -- metrics (pure functions; the tests build cases for them) ---------------------------------------
def coherence(
    read: Sequence[dict[str, str]], parsed: Sequence[dict[str, str] | None], names: Sequence[str]
) -> dict[str, float]:
    """Share of samples whose image reading equals their caption's attributes, per attribute and
    "all" at once. A caption that does not parse (None) matches nothing."""
    if len(read) != len(parsed) or not read:
        raise ValueError(f"coherence needs equally long non-empty lists, got {len(read)} and {len(parsed)}")
    hits = np.array([[p is not None and r[k] == p[k] for k in names] for r, p in zip(read, parsed)])  # (N, A)
    out = {k: float(hits[:, j].mean()) for j, k in enumerate(names)}
    out["all"] = float(hits.all(axis=1).mean())
    return out


def chance_coherence(
    read: Sequence[dict[str, str]], parsed: Sequence[dict[str, str]], names: Sequence[str]
) -> dict[str, float]:
    """Expected per-attribute coherence of independent readings and captions: sum_v p_read(v) p_caption(v)."""
    out = {}
    for k in names:
        a = _frequencies([r[k] for r in read])
        b = _frequencies([p[k] for p in parsed])
        out[k] = float(sum(a[v] * b.get(v, 0.0) for v in a))
    return out


def _frequencies(values: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        out[v] = out.get(v, 0.0) + 1.0 / len(values)
    return out


def canonical(text: str) -> str:
    """Caption spelling for verbatim comparison: case, spacing and a word tokenizer's " ," do not count."""
    return " ".join(text.lower().replace(" ,", ",").replace(" .", ".").split()).removesuffix(".")


def validity(captions: Sequence[str], examples: int = 5) -> dict[str, Any]:
    """Share of captions that parse in the grammar, with a few that do not."""
    bad = [c for c in captions if parse_caption(c) is None]
    return {"share": 1.0 - len(bad) / len(captions), "n": len(captions), "invalid_examples": bad[:examples]}


def diversity(captions: Sequence[str], train_captions: Sequence[str]) -> dict[str, Any]:
    """Distinct share of the captions, and share not found verbatim among the training captions."""
    seen = {canonical(c) for c in train_captions}
    mine = [canonical(c) for c in captions]
    return {
        "distinct_share": len(set(mine)) / len(mine),
        "novel_share": float(np.mean([c not in seen for c in mine])),
        "n": len(mine),
        "train_captions": len(seen),
    }


def _combo(attrs: dict[str, str], names: Sequence[str]) -> tuple[str, ...]:
    return tuple(attrs[k] for k in names)


def coverage(
    reference: Sequence[dict[str, str]], candidate: Sequence[dict[str, str] | None], names: Sequence[str]
) -> dict[str, float]:
    """Share of the attribute combinations of `reference` that appear in `candidate` ("combos"),
    and the same for attribute-value pairs of two attributes ("pairs"). None candidates count for nothing."""
    ref = {_combo(a, names) for a in reference}
    got = {_combo(a, names) for a in candidate if a is not None}

    def pairs(rows: Sequence[dict[str, str] | None]) -> set[tuple[str, str, str, str]]:
        return {(x, a[x], y, a[y]) for a in rows if a is not None for x, y in combinations(names, 2)}

    ref_pairs = pairs(reference)
    return {
        "combos": len(ref & got) / len(ref),
        "pairs": len(ref_pairs & pairs(candidate)) / len(ref_pairs),
        "reference_combos": len(ref),
    }


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets (N, F).

    The trace term uses the eigenvalues of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2, which
    has the same trace of square root as S_a S_b and is stable without scipy.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two (N>=2, F) arrays, got {a.shape} and {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace = np.trace(s_a) + np.trace(s_b) - 2.0 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + max(trace, 0.0))


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n1 n2)."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(positive) or not len(negative):
        raise ValueError("auc needs at least one positive and one negative score")
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share the mean of their ranks.
    uniq, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.zeros(len(uniq))
    np.add.at(sums, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def distribution(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    out = {"mean": float(x.mean()), "std": float(x.std())}
    out.update({f"q{int(q * 100):02d}": float(np.quantile(x, q)) for q in QUANTILES})
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (n >= 2): a random cycle, so no pair stays together."""
    perm = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.roll(perm, -1)
    return out


# -- model helpers, batched -------------------------------------------------------------------------
@dataclass
class Generated:
    seeds: list[int]
    images: np.ndarray  # uint8 (N, S, S)
    captions: list[str]
    alignment: np.ndarray  # float32 (N,)


def generate_batched(ink: Inkseed, seeds: Sequence[int], batch_size: int) -> Generated:
    images, captions, scores = [], [], []
    for i in range(0, len(seeds), batch_size):
        s = ink.generate(list(seeds[i : i + batch_size]))
        images.append(s.images)
        captions += s.captions
        scores.append(s.alignment)
    return Generated(list(seeds), np.concatenate(images), captions, np.concatenate(scores))


def _batched(fn: Callable[[int, int], Any], n: int, batch_size: int) -> list[Any]:
    return [fn(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def caption_batched(ink: Inkseed, images: np.ndarray, batch_size: int) -> list[str]:
    return [
        c for part in _batched(lambda a, b: ink.caption(images[a:b]), len(images), batch_size) for c in part
    ]


def illustrate_batched(
    ink: Inkseed, captions: Sequence[str], seeds: Sequence[int], batch_size: int
) -> np.ndarray:
    parts = _batched(
        lambda a, b: ink.illustrate(list(captions[a:b]), list(seeds[a:b])), len(captions), batch_size
    )
    return np.concatenate(parts)


def alignment_batched(
    ink: Inkseed, images: np.ndarray, captions: Sequence[str], batch_size: int
) -> np.ndarray:
    parts = _batched(lambda a, b: ink.alignment(images[a:b], list(captions[a:b])), len(captions), batch_size)
    return np.concatenate(parts)


# -- report sections --------------------------------------------------------------------------------
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


# -- contact sheet ----------------------------------------------------------------------------------
def _png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _figure(image: np.ndarray, caption: str, score: float, seed: int) -> str:
    data = base64.b64encode(_png(np.asarray(image))).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="seed {seed}"><figcaption>'
        f"<b>seed {seed}</b> · alignment {float(score):+.3f}<br>{html.escape(caption)}</figcaption></figure>"
    )


def contact_sheet(
    images: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[str],
    scores: Sequence[float],
    path_png: str,
    path_html: str,
    seeds: Sequence[int] | None = None,
    columns: int = 8,
) -> None:
    """Write a PNG grid and a self-contained HTML page (images embedded as data URIs) of samples,
    each with its seed, alignment score and caption. Paths may be local or s3://."""
    if not (len(images) == len(captions) == len(scores)) or not len(captions):
        raise ValueError(
            f"contact_sheet needs as many images, captions and scores (>0): "
            f"{len(images)}, {len(captions)}, {len(scores)}"
        )
    seeds = list(seeds) if seeds is not None else list(range(len(captions)))
    labels = [f"seed {s}  align {float(a):+.2f}" for s, a in zip(seeds, scores)]
    sheet = render_sheet([np.asarray(i) for i in images], labels, list(captions), columns=columns)
    storage.write_bytes(path_png, _png(sheet))
    cells = "\n".join(_figure(img, c, a, s) for img, c, a, s in zip(images, captions, scores, seeds))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>inkseed contact sheet</title><style>"
        "body{font-family:sans-serif;background:#fff}main{display:grid;grid-template-columns:repeat(auto-fill,200px);gap:12px}"
        "figure{margin:0}img{width:192px;height:192px;image-rendering:pixelated;border:1px solid #ccc}"
        "figcaption{font-size:12px}</style></head><body>"
        f"<h1>inkseed contact sheet</h1><p>{len(captions)} samples (PNG: {html.escape(path_png.rsplit('/', 1)[-1])})</p>"
        f"<main>\n{cells}\n</main></body></html>\n"
    )
    storage.write_bytes(path_html, page.encode())


# -- the job ----------------------------------------------------------------------------------------
def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("device cuda requested but torch sees no GPU")
    return choice


def _read_train_captions(uri: str) -> list[str]:
    from pipeline.data.ingest import read_captions

    return read_captions(uri, split="train")


def applicability(val: RealSet) -> dict[str, str | None]:
    """Why the grammar / attribute metrics do not apply to this dataset (None when they do)."""
    grammar_share = float(np.mean([parse_caption(c) is not None for c in val.captions]))
    attr_share = float(np.mean([a is not None for a in val.attributes]))
    return {
        "grammar": None
        if grammar_share >= MIN_SHARE
        else (
            f"only {grammar_share:.1%} of the dataset's held-out captions parse in the engraving grammar "
            f"(needs {MIN_SHARE:.0%}): caption parsing says nothing about this dataset"
        ),
        "attributes": None
        if attr_share >= MIN_SHARE
        else (
            f"only {attr_share:.1%} of the held-out rows carry all of {sorted(ATTRIBUTES)} in their metadata "
            f"(needs {MIN_SHARE:.0%}): no labels to train the attribute probe on"
        ),
    }


def probe_sections(
    ink: Inkseed, probe: Probe, gen: Generated, val: RealSet, cfg: EvaluateConfig, with_grammar: bool
) -> dict[str, Any]:
    """fidelity, and with the grammar: coherence, coverage and the conditional modes."""
    names = list(ATTRIBUTES)
    gen_read, gen_feats = probe.read(gen.images)
    real_read, real_feats = probe.read(val.images)
    out: dict[str, Any] = {"fidelity": fidelity_section(gen_feats, real_feats, cfg.seed_start)}
    if with_grammar:
        gen_parsed = [parse_caption(c) for c in gen.captions]
        out["coherence"] = coherence_section(gen_read, gen_parsed, real_read, val.captions, names)
        out["coverage"] = coverage_section(gen_parsed, gen_read, val, names, cfg.seed_start)
        out["conditional"] = conditional_section(
            ink, probe, val, names, cfg.num_conditional, cfg.seed_start, cfg.batch_size
        )
    return out


def run_evaluation(cfg: EvaluateConfig, log: Log = print) -> dict[str, Any]:
    """Measure a checkpoint against a dataset; write report.json and the contact sheet to cfg.out."""
    cfg.validate()
    storage.check_writable(cfg.out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    ink = storage.open_checkpoint(cfg.checkpoint, _device(cfg.device))
    size = ink.config.image_size
    cfg = replace(cfg, probe=replace(cfg.probe, image_size=size))  # the probe reads what the model makes
    log(f"evaluate: checkpoint {cfg.checkpoint} ({size}px, digest {ink.digest[:12]}), data {cfg.data}")
    val_all = load_real(cfg.data, size, "val")
    train_captions = _read_train_captions(cfg.data)
    why_not = applicability(val_all)
    val = val_all.labeled() if why_not["attributes"] is None else val_all
    t = lap("load", t0)

    probe: Probe | None = None
    if why_not["attributes"] is None:
        probe = get_probe(cfg.data, cfg.probe, cache_dir=cfg.probe_cache, val=val, log=log)
        t = lap("probe", t)

    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.num_seeds))
    gen = generate_batched(ink, seeds, cfg.batch_size)
    t = lap("generate", t)
    log(f"evaluate: generated {len(seeds)} seeds in {timings['generate']:.0f}s")

    report: dict[str, Any] = {
        "checkpoint": {"path": cfg.checkpoint, "digest": ink.digest, "image_size": size},
        "data": {"uri": cfg.data, "held_out": len(val_all), "train_captions": len(train_captions)},
        "num_seeds": cfg.num_seeds,
        "seed_start": cfg.seed_start,
        "config": asdict(cfg),
    }
    skipped: dict[str, str] = {}

    def skip(metric: str, reason: str) -> None:
        report[metric] = {"skipped": reason}
        skipped[metric] = reason

    report["probe"] = probe.summary() if probe else {"skipped": why_not["attributes"]}
    if why_not["grammar"]:
        skip("validity", why_not["grammar"])
    else:
        report["validity"] = validity(gen.captions)
    report["diversity"] = diversity(gen.captions, train_captions)

    if probe is None:
        skip("fidelity", why_not["attributes"] or "")
    grammar_reason = why_not["attributes"] or why_not["grammar"]
    if grammar_reason:
        for metric in ("coherence", "coverage", "conditional"):
            skip(metric, grammar_reason)
    if probe is not None:
        report.update(probe_sections(ink, probe, gen, val, cfg, with_grammar=not grammar_reason))
        t = lap("probe_metrics", t)

    report["determinism"] = determinism_section(ink, gen, cfg.determinism_seeds, cfg.batch_size)
    t = lap("determinism", t)
    n_real = min(len(val), cfg.num_seeds)
    real = (
        alignment_section(
            ink, val.images[:n_real], val.captions[:n_real], None, cfg.batch_size, cfg.seed_start
        )
        if n_real >= 2
        else {"skipped": f"{n_real} held-out pair(s): shuffling needs at least 2"}
    )
    report["alignment"] = {
        "generated": alignment_section(
            ink, gen.images, gen.captions, gen.alignment, cfg.batch_size, cfg.seed_start
        ),
        "real": real,
    }
    t = lap("alignment", t)

    k = min(cfg.contact_seeds, len(seeds))
    png, page = storage.join(cfg.out, "contact_sheet.png"), storage.join(cfg.out, "contact_sheet.html")
    contact_sheet(gen.images[:k], gen.captions[:k], gen.alignment[:k], png, page, seeds=seeds[:k])
    report["contact_sheet"] = {"png": png, "html": page, "seeds": [seeds[0], seeds[k - 1]]}
    report["skipped"] = skipped
    report["targets"] = check_targets(report)
    lap("contact_sheet", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    report["timings_s"] = timings
    storage.write_bytes(storage.join(cfg.out, "report.json"), json.dumps(report, indent=2).encode())
    log(format_table(report))
    return report


# -- the quality targets ---------------------------------------------------------------------------
# Issue 7's targets for the `base` preset on the embedded engravings at 1,000 seeds, as
# (label, report path, "min" / "max", bound). Two readings are pinned down here:
# - coverage: n real samples cover only ~0.3 of their own 2,880-scene combinations at n = 1,000,
#   so the target is the generated share *relative to that real ceiling* (combos_ratio);
# - i2t / t2i "attribute accuracy / agreement": the mean over the attributes ("all at once" is
#   reported beside it, and per-attribute values are in the report).
TARGETS: tuple[tuple[str, tuple[str, ...], str, float], ...] = (
    ("coherence, all attributes", ("coherence", "all"), "min", 0.80),
    ("coherence, weakest attribute", ("coherence", "weakest"), "min", 0.90),
    ("caption validity", ("validity", "share"), "min", 0.99),
    ("coverage of combinations / real ceiling", ("coverage", "combos_ratio"), "min", 0.90),
    ("Frechet ratio to the real floor", ("fidelity", "ratio"), "max", 5.0),
    ("i2t caption accuracy, mean", ("conditional", "caption", "accuracy", "mean"), "min", 0.95),
    ("t2i probe agreement, mean", ("conditional", "illustrate", "agreement", "mean"), "min", 0.80),
    ("determinism mismatches", ("determinism", "mismatches"), "max", 0.0),
)


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met (None: the metric was skipped)."""
    rows = []
    for label, path, kind, bound in TARGETS:
        value = _get(report, *path)
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        rows.append({"metric": label, "value": value, "target": f"{'>=' if kind == 'min' else '<='} {bound:g}",
                     "met": met})
    return rows


# -- the printed table ------------------------------------------------------------------------------
def _get(report: dict[str, Any], *path: str) -> Any:
    node: Any = report
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def format_table(report: dict[str, Any]) -> str:
    """A short text table of the headline numbers (value, and its ceiling/floor where one exists)."""
    rows: list[tuple[str, tuple[str, ...], tuple[str, ...] | None]] = [
        ("probe accuracy (held-out, all)", ("probe", "accuracy", "all"), None),
        ("coherence, all attributes", ("coherence", "all"), ("coherence", "ceiling", "all")),
        *[(f"coherence, {k}", ("coherence", k), ("coherence", "ceiling", k)) for k in ATTRIBUTES],
        ("caption validity", ("validity", "share"), None),
        ("distinct captions", ("diversity", "distinct_share"), None),
        ("novel captions (not in train)", ("diversity", "novel_share"), None),
        ("coverage, combinations", ("coverage", "combos"), ("coverage", "combos_ceiling")),
        ("coverage, combinations / ceiling", ("coverage", "combos_ratio"), None),
        ("coverage, attribute pairs", ("coverage", "pairs"), ("coverage", "pairs_ceiling")),
        ("Frechet distance (floor)", ("fidelity", "frechet"), ("fidelity", "floor")),
        ("Frechet ratio to floor", ("fidelity", "ratio"), None),
        ("i2t caption accuracy, mean", ("conditional", "caption", "accuracy", "mean"), None),
        ("i2t caption accuracy, all", ("conditional", "caption", "accuracy", "all"), None),
        ("t2i probe agreement, mean", ("conditional", "illustrate", "agreement", "mean"), None),
        ("t2i probe agreement, all", ("conditional", "illustrate", "agreement", "all"), None),
        ("determinism mismatches", ("determinism", "mismatches"), None),
        ("alignment mean (generated)", ("alignment", "generated", "true_pairs", "mean"), None),
        ("alignment AUC generated (real)", ("alignment", "generated", "auc"), ("alignment", "real", "auc")),
    ]
    lines = [f"{'metric':<34} {'value':>10} {'ceiling/floor':>14}"]
    for label, path, ref in rows:
        value = _get(report, *path)
        if value is None:
            reason = _get(report, path[0], "skipped")
            if reason:
                lines.append(f"{label:<34} {'skipped':>10}")
            continue
        ref_value = _get(report, *ref) if ref else None
        lines.append(f"{label:<34} {_fmt(value):>10} {_fmt(ref_value) if ref_value is not None else '':>14}")
    for metric, reason in report.get("skipped", {}).items():
        lines.append(f"skipped {metric}: {reason}")
    checked = [t for t in report.get("targets", []) if t["met"] is not None]
    if checked:
        lines.append(
            f"targets of the base preset at 1,000 seeds (issue 7): {sum(t['met'] for t in checked)}/{len(checked)} met"
        )
        for t in checked:
            lines.append(f"  {'met ' if t['met'] else 'MISS'} {t['metric']:<40} {_fmt(t['value']):>8} {t['target']}")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)

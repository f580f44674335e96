"""The evaluation's metrics as pure functions of numbers, labels and captions (no model, no I/O):
the tests build cases with known answers for each."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from model.tokenizer import canonical_caption
from pipeline.data.grammar import parse_caption

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)



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


def validity(captions: Sequence[str], examples: int = 5) -> dict[str, Any]:
    """Share of captions that parse in the grammar, with a few that do not."""
    bad = [c for c in captions if parse_caption(c) is None]
    return {"share": 1.0 - len(bad) / len(captions), "n": len(captions), "invalid_examples": bad[:examples]}


def diversity(captions: Sequence[str], train_captions: Sequence[str]) -> dict[str, Any]:
    """Distinct share of the captions, and share not found verbatim among the training captions."""
    seen = {canonical_caption(c) for c in train_captions}
    mine = [canonical_caption(c) for c in captions]
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

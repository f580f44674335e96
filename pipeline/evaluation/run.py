"""Quality, measured: the metrics of `jobs.evaluate`, its report.json and its contact sheet.

For N seeds of a checkpoint, against the held-out (val) split of a dataset:

- probe: a CNN trained on real train images reads every attribute (pipeline/evaluation/probe.py); its
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

import json
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from model.checkpoint import Inkseed
from model.sampling import resolve_device
from pipeline import storage
from pipeline.contact_sheet import write_sheet
from pipeline.data.grammar import ATTRIBUTES, parse_caption
from pipeline.evaluation.batched import Generated, generate_batched
from pipeline.evaluation.config import MIN_SHARE, EvaluateConfig, EvaluateError, Log
from pipeline.evaluation.metrics import diversity, validity
from pipeline.evaluation.probe import Probe
from pipeline.evaluation.probe_cache import get_probe
from pipeline.evaluation.real import RealSet, load_real
from pipeline.evaluation.sections import (
    alignment_section,
    coherence_section,
    conditional_section,
    coverage_section,
    determinism_section,
    fidelity_section,
)
from pipeline.evaluation.targets import check_targets, format_table


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

    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise EvaluateError(str(e)) from e
    ink = storage.open_checkpoint(cfg.checkpoint, str(device))
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
    labels = [f"seed {s}  align {float(a):+.2f}" for s, a in zip(seeds[:k], gen.alignment[:k])]
    write_sheet(gen.images[:k], labels, gen.captions[:k], png, page, columns=8)
    report["contact_sheet"] = {"png": png, "html": page, "seeds": [seeds[0], seeds[k - 1]]}
    report["skipped"] = skipped
    report["targets"] = check_targets(report)
    lap("contact_sheet", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    report["timings_s"] = timings
    storage.write_bytes(storage.join(cfg.out, "report.json"), json.dumps(report, indent=2).encode())
    log(format_table(report))
    return report

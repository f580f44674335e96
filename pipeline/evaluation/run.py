"""Quality, measured: `run_evaluation` writes report.json and the contact sheet of a checkpoint.

For N seeds of a checkpoint, against the held-out (val) split of a dataset, two families of
metrics, each where it applies (both on the procedural engravings):

The grammar family (datasets whose captions parse in the engraving grammar and whose metadata
carries the scene attributes), read by the attribute probe (pipeline/evaluation/probe.py):
- probe: its held-out accuracy says how far its readings can be trusted;
- coherence: share of samples whose probe-read image attributes equal the attributes parsed
  from their own caption, per attribute and all at once; ceiling = the same on real held-out pairs;
- validity: share of generated captions that parse in the grammar;
- coverage: share of the attribute combinations of n real samples found among n generated ones,
  next to the same share for n other real samples (the ceiling); also over attribute-value pairs;
- fidelity: Fréchet distance in probe-feature space, generated vs real, next to real vs real
  (two disjoint held-out sets of the same size: the floor), and their ratio;
- conditional modes: caption held-out images (attribute accuracy of the captions), illustrate
  held-out captions (probe agreement with the caption's attributes);
- targets: issue 7's quality targets for the base preset, each with its value and met / missed.

The free-form family (any dataset), read by an independent contrastive probe trained on the train
split (pipeline/evaluation/freeform.py), never on generated samples:
- retrieval: share of generated pairs whose own caption the probe ranks first among K = 32, next
  to the same on held-out real pairs (the ceiling), their ratio and chance (1/K);
- fidelity: the Fréchet distance in its image features (under fidelity.contrastive when the
  grammar family has its own fidelity), realism: the mean-gradient sharpness ratio to real images;
- captions: repeated n-grams, distinct, novel and known-vocabulary shares;
- conditional.caption.retrieval / conditional.illustrate.retrieval: the same retrieval for
  captions of held-out images and for illustrations of held-out captions.

Every dataset: diversity, determinism (seeds alone and in batches of other sizes must agree),
alignment (the score's distribution and AUC, true vs shuffled pairs) and the contact sheet.
A metric that does not apply is reported as {"skipped": reason}. Runs in-process: only the
dataset read goes through Ray Data.
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
from pipeline.evaluation.probe_cache import (
    contrastive_key,
    default_cache_dir,
    get_contrastive_probe,
    get_probe,
    probe_key,
)
from pipeline.evaluation.real import RealSet, load_real
from pipeline.evaluation.sections import (
    alignment_section,
    coherence_section,
    conditional_section,
    coverage_section,
    determinism_section,
    fidelity_section,
    freeform_sections,
)
from pipeline.evaluation.targets import check_targets, format_table


def _read_train_captions(cfg: EvaluateConfig) -> list[str]:
    from pipeline.data.ingest import read_captions, read_options

    return read_captions(cfg.data, split="train", **read_options(cfg))


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


def grammar_family(
    ink: Inkseed, gen: Generated, splits: dict[str, RealSet], why_not: dict[str, str | None],
    cfg: EvaluateConfig, log: Log,
) -> dict[str, Any]:  # fmt: skip
    """The attribute probe's sections, each replaced by {"skipped": reason} where it does not apply."""
    out: dict[str, Any] = {}
    attributes, grammar = why_not["attributes"], why_not["grammar"]
    out["validity"] = {"skipped": grammar} if grammar else validity(gen.captions)
    reason = attributes or grammar
    for metric in ("fidelity", "coherence", "coverage", "conditional"):
        out[metric] = {"skipped": attributes if metric == "fidelity" else reason}
    if attributes:
        out["probe"] = {"skipped": attributes}
        return out
    val = splits["val"].labeled()
    probe = get_probe(cfg.data, cfg.probe, cache_dir=cfg.probe_cache, val=val, train=splits.get("train"), log=log)
    out["probe"] = probe.summary()
    names = list(ATTRIBUTES)
    gen_read, gen_feats = probe.read(gen.images)
    real_read, real_feats = probe.read(val.images)
    out["fidelity"] = fidelity_section(gen_feats, real_feats, cfg.seed_start)
    if not grammar:
        gen_parsed = [parse_caption(c) for c in gen.captions]
        out["coherence"] = coherence_section(gen_read, gen_parsed, real_read, val.captions, names)
        out["coverage"] = coverage_section(gen_parsed, gen_read, val, names, cfg.seed_start)
        out["conditional"] = conditional_section(
            ink, probe, val, names, cfg.num_conditional, cfg.seed_start, cfg.batch_size
        )
    return out


def freeform_family(
    ink: Inkseed, gen: Generated, splits: dict[str, RealSet], train_captions: list[str], cfg: EvaluateConfig, log: Log
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The contrastive probe's summary and its sections."""
    probe, summary = get_contrastive_probe(
        cfg.data, cfg.contrastive, cache_dir=cfg.probe_cache, train=splits.get("train"), log=log
    )
    return summary, freeform_sections(ink, probe, gen, splits["val"], train_captions, cfg)


def merge_families(report: dict[str, Any], freeform: dict[str, Any]) -> None:
    """Add the free-form sections to the report: new keys as they are; a grammar fidelity keeps its
    place and gets the contrastive one beside it; conditional modes gain their retrieval."""
    for key, section in freeform.items():
        old = report.get(key)
        if old is None or "skipped" in old:
            report[key] = section
        elif key == "fidelity":
            old["contrastive"] = section
        elif key == "conditional":
            for mode, values in section.items():  # the grammar section keeps its own n and examples
                old.setdefault(mode, {})["retrieval"] = values["retrieval"]


def alignment_sections(ink: Inkseed, gen: Generated, val: RealSet, cfg: EvaluateConfig) -> dict[str, Any]:
    """The alignment score on the generated pairs and on as many held-out real pairs."""
    n_real = min(len(val), cfg.num_seeds)
    real = (
        alignment_section(ink, val.images[:n_real], val.captions[:n_real], None, cfg.batch_size, cfg.seed_start)
        if n_real >= 2
        else {"skipped": f"{n_real} held-out pair(s): shuffling needs at least 2"}
    )
    generated = alignment_section(ink, gen.images, gen.captions, gen.alignment, cfg.batch_size, cfg.seed_start)
    return {"generated": generated, "real": real}


def write_contact_sheet(gen: Generated, cfg: EvaluateConfig) -> dict[str, Any]:
    k = min(cfg.contact_seeds, len(gen.seeds))
    png, page = storage.join(cfg.out, "contact_sheet.png"), storage.join(cfg.out, "contact_sheet.html")
    labels = [f"seed {s}  align {float(a):+.2f}" for s, a in zip(gen.seeds[:k], gen.alignment[:k])]
    write_sheet(gen.images[:k], labels, gen.captions[:k], png, page, columns=8)
    return {"png": png, "html": page, "seeds": [gen.seeds[0], gen.seeds[k - 1]]}


def open_inputs(cfg: EvaluateConfig, log: Log) -> tuple[Inkseed, EvaluateConfig, dict[str, RealSet], list[str]]:
    """The checkpoint, the config with the probes at its image size, the real splits the run
    needs (train only when a probe must be trained) and the train captions."""
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise EvaluateError(str(e)) from e
    ink = storage.open_checkpoint(cfg.checkpoint, str(device)).with_sampling(cfg.steps, cfg.bf16)
    size = ink.config.image_size
    cfg = replace(cfg, probe=replace(cfg.probe, image_size=size), contrastive=replace(cfg.contrastive, image_size=size))
    log(f"evaluate: checkpoint {cfg.checkpoint} ({size}px, digest {ink.digest[:12]}), data {cfg.data}")
    splits = {"val": load_real(cfg.data, size, "val", cfg)}
    if needs_training(cfg, with_attribute_probe=applicability(splits["val"])["attributes"] is None):
        splits["train"] = load_real(cfg.data, size, "train", cfg)
    return ink, cfg, splits, _read_train_captions(cfg)


def needs_training(cfg: EvaluateConfig, with_attribute_probe: bool) -> bool:
    """True unless every probe this dataset needs is cached already (the attribute probe only
    where the metadata carries the grammar's attributes)."""
    cache = cfg.probe_cache or default_cache_dir(cfg.data)
    key = contrastive_key(cfg.data, cfg.contrastive)
    contrastive = storage.exists(storage.join(cache, f"contrastive-{cfg.contrastive.image_size}px-{key}.safetensors"))
    attribute = not with_attribute_probe or storage.list_files(cache, f"-{probe_key(cfg.data, cfg.probe)}.safetensors")
    return not (contrastive and attribute)


def run_evaluation(cfg: EvaluateConfig, log: Log = print) -> dict[str, Any]:
    """Measure a checkpoint against a dataset; write report.json and the contact sheet to cfg.out."""
    cfg.validate()
    storage.check_writable(cfg.out)
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name], t = round(time.perf_counter() - t, 1), time.perf_counter()

    ink, cfg, splits, train_captions = open_inputs(cfg, log)
    why_not = applicability(splits["val"])
    lap("load")
    gen = generate_batched(ink, list(range(cfg.seed_start, cfg.seed_start + cfg.num_seeds)), cfg.batch_size)
    lap("generate")
    log(f"evaluate: generated {cfg.num_seeds} seeds in {timings['generate']:.0f}s")
    report: dict[str, Any] = {
        "checkpoint": {"path": cfg.checkpoint, "digest": ink.digest, "image_size": ink.config.image_size},
        "data": {"uri": cfg.data, "held_out": len(splits["val"]), "train_captions": len(train_captions)},
        "num_seeds": cfg.num_seeds,
        "seed_start": cfg.seed_start,
        "config": asdict(cfg),
        "diversity": diversity(gen.captions, train_captions),
        **grammar_family(ink, gen, splits, why_not, cfg, log),
    }
    lap("grammar_metrics")
    report["contrastive_probe"], freeform = freeform_family(ink, gen, splits, train_captions, cfg, log)
    merge_families(report, freeform)
    lap("freeform_metrics")
    report["determinism"] = determinism_section(ink, gen, cfg.determinism_seeds, cfg.batch_size)
    report["alignment"] = alignment_sections(ink, gen, splits["val"], cfg)
    report["contact_sheet"] = write_contact_sheet(gen, cfg)
    report["skipped"] = {k: v["skipped"] for k, v in report.items() if isinstance(v, dict) and "skipped" in v}
    report["targets"] = check_targets(report)
    lap("determinism_alignment_sheet")
    report["timings_s"] = {**timings, "total": round(time.perf_counter() - t0, 1)}
    storage.write_bytes(storage.join(cfg.out, "report.json"), json.dumps(report, indent=2).encode())
    log(format_table(report))
    return report

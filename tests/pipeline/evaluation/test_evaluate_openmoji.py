"""jobs.evaluate on real drawings with free-form captions: a few hundred OpenMoji drawings rendered
here from the installed package. The grammar family is skipped with its reason, the free-form
family reports every key other tools read, the probe's ceiling is well above chance, and real
pairs passed in as "generated" score like real pairs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import FAST_CONTRASTIVE, run_job

from model.checkpoint import save_checkpoint
from pipeline.data import openmoji
from pipeline.evaluation.batched import Generated
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.freeform import retrieval_at_k, sharpness_ratio
from pipeline.evaluation.probe_cache import get_contrastive_probe
from pipeline.evaluation.real import load_real
from pipeline.evaluation.sections import freeform_sections

from builders import scrambled_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COUNT = 640  # ~64 held-out drawings: enough for K = 32


@pytest.fixture(scope="module")
def drawings(openmoji_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("om") / "openmoji"
    openmoji.render_openmoji(str(out), size=64, source=str(openmoji_source), limit=COUNT)
    return out


@pytest.fixture(scope="module")
def report(ray_local, drawings: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    captions = [json.loads(line)["text"] for line in (drawings / "metadata.jsonl").read_text().splitlines()]
    ckpt = tmp_path_factory.mktemp("om-ckpt") / "ckpt"
    save_checkpoint(ckpt, *scrambled_tiny(captions))
    return run_job(str(ckpt), drawings, tmp_path_factory.mktemp("om-eval"), "--num-conditional", "40")


def test_free_form_keys_and_grammar_skipped(report: dict) -> None:
    for metric in ("validity", "coherence", "coverage"):
        assert "grammar" in report[metric]["skipped"] or "attribute" in report[metric]["skipped"]
    ret = report["retrieval"]
    assert set(ret) >= {"coherence", "ceiling", "ratio", "chance"} and ret["chance"] == pytest.approx(1 / 32)
    assert ret["ratio"] == pytest.approx(ret["coherence"] / ret["ceiling"])
    assert set(report["fidelity"]) >= {"frechet", "floor", "ratio"}
    # An untrained model paints noise-like blobs: far from the real drawings in the probe's space.
    assert report["fidelity"]["ratio"] > 2
    assert 0 < report["realism"]["sharpness_ratio"]
    caps = report["captions"]
    assert set(caps) >= {"repeated_ngram_share", "distinct_share", "novel_share", "vocab_known_share"}
    assert caps["vocab_known_share"] > 0.9  # its tokenizer was built from these captions
    for mode in ("caption", "illustrate"):
        assert 0 <= report["conditional"][mode]["retrieval"] <= 1 and report["conditional"][mode]["n"] == 40


def test_the_probe_ceiling_is_well_above_chance(report: dict) -> None:
    """Real held-out drawings find their own caption among 32 far more often than 1 in 32."""
    print("OpenMoji retrieval:", report["retrieval"])
    assert report["retrieval"]["ceiling"] > 5 * report["retrieval"]["chance"], report["retrieval"]


def test_known_answers_on_real_pairs(ray_local, drawings: Path, report: dict) -> None:
    """With the probe the job cached: real pairs as "generated" give a ratio of about 1, shuffled
    captions fall to chance, blurred drawings are much less sharp."""
    probe, info = get_contrastive_probe(str(drawings), dataclasses.replace(FAST_CONTRASTIVE, image_size=64))
    assert info["cached"]  # the job trained it; here it is read back by the dataset's digest
    val = load_real(str(drawings), 64, "val")
    real_as_generated = Generated(list(range(len(val))), val.images, val.captions, np.zeros(len(val), np.float32))
    cfg = EvaluateConfig(data=str(drawings), num_seeds=len(val), num_conditional=1)
    ret = freeform_sections(None, probe, real_as_generated, val, val.captions, cfg)["retrieval"]  # type: ignore[arg-type]
    assert ret["ratio"] == 1.0 and ret["coherence"] == ret["ceiling"] > 0.1
    shuffled = list(np.random.default_rng(0).permutation(val.captions))
    assert retrieval_at_k(probe, val.images, shuffled, 32, seed=0) < 3 / 32
    from PIL import Image, ImageFilter

    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in val.images])
    assert sharpness_ratio(blurred, val.images) < 0.7 and sharpness_ratio(val.images, val.images) == 1.0

"""Checkpoints: round-trip (same outputs, same digest), and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CheckpointError,
    checkpoint_digest,
    load_checkpoint,
    load_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
    save_state,
)
from model.config import get_preset
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer

torch.set_num_threads(2)
CAPTIONS = [
    "an engraving of a ship at sea, in the middle, at night",
    "a print of a tree in a field, on the left, by day",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    tok = CaptionTokenizer.train(CAPTIONS)
    model = JointModel(get_preset("tiny"), tok.vocab_size)
    with torch.no_grad():
        model.fit_latent_stats(torch.randn(64, model.config.z_dim) * 3)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    digest = save_checkpoint(path, model, tok, extra={"step": 10, "note": "test"})
    return path, model, tok, digest


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def test_roundtrip_same_outputs(saved):
    path, model, tok, digest = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ck = load_checkpoint(path)
    assert ck.digest == digest == checkpoint_digest(path) and len(digest) == 64
    assert ck.extra == {"step": 10, "note": "test"}
    assert ck.config == model.config and ck.tokenizer == tok
    assert not ck.model.training
    for (k, a), b in zip(model.state_dict().items(), ck.model.state_dict().values()):
        assert torch.equal(a, b), k
    ck.model.caption_decoder.embed.weight.data[5, 0] += 1  # tying survives loading
    assert ck.model.caption_decoder.lm_head.weight[5, 0] == ck.model.caption_decoder.embed.weight[5, 0]
    ck = load_checkpoint(path)
    from model import sampling

    a = sampling.generate(model, tok, [1, 2, 3], steps=5)
    b = ck.generate([1, 2, 3], steps=5)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert ck.caption(a.images) == sampling.caption(model, tok, a.images)
    assert ck.illustrate(CAPTIONS, [1, 2]).shape == (2, 64, 64)
    assert len(ck.interpolate(1, 2, 3, ddim_steps=3)) == 3


def test_digest_is_stable_across_saves(saved, tmp_path):
    path, model, tok, digest = saved
    assert save_checkpoint(tmp_path / "again", model, tok, extra={"step": 10, "note": "test"}) == digest
    assert save_checkpoint(tmp_path / "other", model, tok, extra={"step": 11}) != digest


def test_never_unpickles(saved, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_checkpoint(saved[0])


def test_missing_dir_and_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        dst = _copy(saved, tmp_path / name)
        (dst / name).unlink()
        with pytest.raises(CheckpointError, match=f"{name}: missing"):
            load_checkpoint(dst)


def test_truncated_weights(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    w = dst / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_checkpoint(dst)
    w.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_checkpoint(dst)


def test_tampered_weights(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    w = dst / "model.safetensors"
    state = load_file(str(w))
    state["image_decoder.out.bias"] = state["image_decoder.out.bias"] + 1.0
    save_file(state, str(w), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_checkpoint(dst)


def _rewrite(dst: Path, state: dict) -> None:
    """Replace the weights and fix the recorded hash, so only the structure is wrong."""
    from model.checkpoint import sha256_file

    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((dst / "config.json").read_text())
    meta["weights_sha256"] = sha256_file(dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(meta))


def test_missing_and_unexpected_keys(saved, tmp_path):
    dst = _copy(saved, tmp_path / "a")
    state = load_file(str(dst / "model.safetensors"))
    state.pop("prior.out.weight")
    _rewrite(dst, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing 1 weight.*prior\.out\.weight"):
        load_checkpoint(dst)
    dst = _copy(saved, tmp_path / "b")
    state = load_file(str(dst / "model.safetensors"))
    state["extra.layer"] = torch.zeros(3)
    _rewrite(dst, state)
    with pytest.raises(CheckpointError, match=r"unexpected weight.*extra\.layer"):
        load_checkpoint(dst)


def test_non_finite_weights_are_refused(saved, tmp_path):
    """NaN weights with a correct hash (a diverged run saved as is) must not load: they would
    write black images with empty captions and NaN alignment into a manifest."""
    dst = _copy(saved, tmp_path / "nan")
    state = load_file(str(dst / "model.safetensors"))
    state["prior.out.weight"][0, 0] = float("nan")
    _rewrite(dst, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 1 weight\(s\) hold NaN or inf values.*prior\.out\.weight"):
        load_checkpoint(dst)


def test_shape_mismatch_config_vs_weights(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    meta = json.loads((dst / "config.json").read_text())
    cfg = get_preset("tiny").replace(image_size=128, channels=(128, 64, 32, 16, 8, 8))
    meta["model_config"] = cfg.to_dict()
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatch.*image_size=128"):
        load_checkpoint(dst)


def test_bad_config_and_tokenizer(saved, tmp_path):
    dst = _copy(saved, tmp_path / "a")
    (dst / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not readable as JSON"):
        load_checkpoint(dst)
    dst = _copy(saved, tmp_path / "b")
    meta = json.loads((dst / "config.json").read_text())
    meta["format_version"] = 99
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(dst)
    dst = _copy(saved, tmp_path / "c")
    (dst / "tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer"):
        load_checkpoint(dst)
    dst = _copy(saved, tmp_path / "d")
    (dst / "tokenizer.json").write_text(CaptionTokenizer.train(["a b c d e f g"]).to_json())
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: has \d+ tokens"):
        load_checkpoint(dst)


def test_extra_must_be_json(saved, tmp_path):
    _, model, tok, _ = saved
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x", model, tok, extra={"bad": object()})


def test_optimizer_state_roundtrip(saved, tmp_path):
    _, model, tok, _ = saved
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(2, 64, 64) * 2 - 1
    tokens = tok.encode(CAPTIONS, 32)
    model.train()
    model(images, tokens)["loss"].backward()
    opt.step()
    model.eval()
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    save_state(tmp_path / "opt.safetensors", tensors, {**meta, "epoch": 3})
    t2, m2 = load_state(tmp_path / "opt.safetensors")
    assert m2["epoch"] == 3
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(optimizer_state_from_tensors(t2, m2))
    assert len(opt.state) == len(opt2.state) > 0
    for p in opt.state:
        a, b = opt.state[p], opt2.state[p]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    (tmp_path / "opt.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="opt.safetensors: truncated or corrupt"):
        load_state(tmp_path / "opt.safetensors")

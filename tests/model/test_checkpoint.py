"""Checkpoints: round-trip (same outputs, same digest), clear errors for bad checkpoints, the
hashes over config, tokenizer and weights (and the legacy weights-only format), config limits."""

from __future__ import annotations

import json
import pickle
import random
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import sampling
from model.checkpoint import (
    FORMAT_VERSION,
    LEGACY_FORMAT,
    CheckpointError,
    checkpoint_digest,
    config_sha256,
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
    a = sampling.generate(model, tok, [1, 2, 3], steps=5)
    b = ck.generate([1, 2, 3], steps=5)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert ck.caption(a.images) == sampling.caption(model, tok, a.images)
    assert ck.illustrate(CAPTIONS, [1, 2]).shape == (2, 64, 64)
    assert len(ck.interpolate(1, 2, 3, ddim_steps=3)) == 3



def test_with_sampling_sets_the_defaults_of_every_call(saved):
    path, model, tok, _ = saved
    ck = load_checkpoint(path).with_sampling(steps=3, autocast=True)
    plain = load_checkpoint(path)
    a = ck.generate([4, 5])
    b = sampling.generate(model, tok, [4, 5], steps=3, autocast=True)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert not np.array_equal(plain.generate([4, 5], steps=50).images, a.images)  # 3 steps differ from 50
    c = ck.generate([4, 5], steps=50, autocast=False)  # a call's own arguments win
    assert np.array_equal(c.images, plain.generate([4, 5], steps=50).images)
    i = ck.interpolate(4, 5, 3)  # its DDIM steps default too
    assert np.array_equal(i.images, sampling.interpolate(model, tok, 4, 5, 3, ddim_steps=3, autocast=True).images)

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


def _write_meta(dst: Path, meta: dict) -> None:
    """Write config.json with its config_sha256 made to match, as a careful forger would: what
    is left to catch is the content itself."""
    meta["config_sha256"] = config_sha256(meta)
    (dst / "config.json").write_text(json.dumps(meta))


def _meta(dst: Path) -> dict:
    return json.loads((dst / "config.json").read_text())


def _rewrite(dst: Path, state: dict) -> None:
    """Replace the weights and fix the recorded hashes, so only the structure is wrong."""
    from model.checkpoint import sha256_file

    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    meta = _meta(dst)
    meta["weights_sha256"] = sha256_file(dst / "model.safetensors")
    _write_meta(dst, meta)


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
    meta = _meta(dst)
    cfg = get_preset("tiny").replace(image_size=128, channels=(128, 64, 32, 16, 8, 8))
    meta["model_config"] = cfg.to_dict()
    _write_meta(dst, meta)
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
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: sha256 mismatch"):
        load_checkpoint(dst)
    _make_legacy(dst)  # format 1 has no tokenizer hash: the token count still catches this one
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


# -- what the stored hashes cover (issue 15) --------------------------------------------------------
def _make_legacy(dst: Path) -> None:
    """Turn a checkpoint into format 1, as checkpoints/default is: weights_sha256 only."""
    meta = _meta(dst)
    for key in ("tokenizer_sha256", "config_sha256"):
        meta.pop(key, None)
    meta["format_version"] = LEGACY_FORMAT
    (dst / "config.json").write_text(json.dumps(meta))


def test_new_checkpoints_hash_config_tokenizer_and_weights(saved):
    from model.checkpoint import sha256_file

    path = saved[0]
    meta = _meta(path)
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["weights_sha256"] == sha256_file(path / "model.safetensors")
    assert meta["tokenizer_sha256"] == sha256_file(path / "tokenizer.json")
    assert meta["config_sha256"] == config_sha256(meta)


def test_a_config_edit_that_keeps_every_shape_is_refused(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    meta = _meta(dst)
    meta["model_config"]["ddim_steps"] = 3  # no weight changes shape
    (dst / "config.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 mismatch.*edited after saving"):
        load_checkpoint(dst)
    meta = _meta(dst)
    meta["extra"]["step"] = 11  # provenance is covered too
    meta["model_config"]["ddim_steps"] = _meta(saved[0])["model_config"]["ddim_steps"]
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 mismatch"):
        load_checkpoint(dst)
    (dst / "config.json").write_text(json.dumps(_meta(saved[0])))  # reformatted, same content: fine
    assert load_checkpoint(dst).config.ddim_steps == saved[1].config.ddim_steps


def _shuffled_tokenizer(tok: CaptionTokenizer) -> str:
    """The same vocabulary with the word ids permuted (specials stay): same size, other ids."""
    doc = json.loads(tok.to_json())
    vocab = doc["model"]["vocab"]
    words = sorted((w for w, i in vocab.items() if i >= 4), key=vocab.get)
    ids = [vocab[w] for w in words]
    random.Random(0).shuffle(ids)
    doc["model"]["vocab"] = {**{w: i for w, i in vocab.items() if i < 4}, **dict(zip(words, ids))}
    return json.dumps(doc)


def test_a_tokenizer_with_shuffled_ids_is_refused(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    (dst / "tokenizer.json").write_text(_shuffled_tokenizer(saved[2]))
    shuffled = CaptionTokenizer.from_json((dst / "tokenizer.json").read_text())
    assert shuffled.vocab_size == saved[2].vocab_size and shuffled.vocab != saved[2].vocab
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: sha256 mismatch.*token ids would not match"):
        load_checkpoint(dst)


def test_legacy_weights_only_checkpoints_still_load(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    _make_legacy(dst)
    ck = load_checkpoint(dst)
    assert ck.config == saved[1].config and ck.tokenizer == saved[2]
    # The legacy rule checks the weights only: tampering with them is still caught.
    state = load_file(str(dst / "model.safetensors"))
    state["prior.out.bias"] = state["prior.out.bias"] + 1.0
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_checkpoint(dst)


@pytest.mark.parametrize("name", ["default", "openmoji"])
def test_the_committed_checkpoints_have_every_hash_and_load(name):
    """Both committed checkpoints are format 2: their digest covers config, tokenizer and weights."""
    path = Path(__file__).resolve().parents[2] / "checkpoints" / name
    meta = _meta(path)
    assert meta["format_version"] == FORMAT_VERSION
    assert {"config_sha256", "tokenizer_sha256", "weights_sha256"} <= set(meta)
    assert load_checkpoint(path).config.image_size == {"default": 128, "openmoji": 64}[name]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("channels", [100_000, 64, 32, 16, 8], r"model_config\.channels\[0\]=100000 is outside the supported range 1\.\.4096"),
        ("text_layers", 10**7, r"model_config\.text_layers=10000000 is outside the supported range 1\.\.64"),
        ("z_dim", 32.5, r"model_config\.z_dim must be an integer, got 32\.5"),
        ("channels", "wide", r"model_config\.channels must be a list of 1\.\.16 integers"),
        ("decoder_widths", [0, 0, 10**6, 0, 0], r"model_config\.decoder_widths\[2\]=1000000 is outside the supported range 0\.\.4096"),
    ],
)
def test_config_sizes_beyond_the_limits_are_refused_before_building(saved, tmp_path, field, value, message):
    dst = _copy(saved, tmp_path)
    meta = _meta(dst)
    meta["model_config"][field] = value
    _write_meta(dst, meta)  # a matching hash: the limits are what refuse it
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_checkpoint(dst)


@pytest.mark.parametrize("value", ["12", 12.5, True, None])
def test_a_non_integer_vocab_size_is_a_checkpoint_error(saved, tmp_path, value):
    dst = _copy(saved, tmp_path)
    meta = _meta(dst)
    meta["vocab_size"] = value
    _write_meta(dst, meta)
    with pytest.raises(CheckpointError, match=r"config\.json: vocab_size must be an integer"):
        load_checkpoint(dst)


def test_a_big_config_that_does_not_fit_the_weights_allocates_nothing(saved, tmp_path):
    """Channels of 4096 are within the limits, but the real network would take ~3.5 GB: the shapes
    are compared on the meta device first, so the process's peak memory does not move."""
    dst = _copy(saved, tmp_path)
    meta = _meta(dst)
    meta["model_config"]["channels"] = [4096] * 5
    _write_meta(dst, meta)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatch"):
        load_checkpoint(dst)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024


def test_extra_with_int_keys_and_tuples_round_trips_through_the_hash(saved, tmp_path):
    """config_sha256 is taken over what config.json reads back as: int keys become strings and
    sort differently, tuples become lists."""
    _, model, tok, _ = saved
    save_checkpoint(tmp_path / "x", model, tok, extra={"by_epoch": {10: 0.5, 9: 0.6}, "pair": (1, 2)})
    assert load_checkpoint(tmp_path / "x").extra == {"by_epoch": {"10": 0.5, "9": 0.6}, "pair": [1, 2]}


# -- checkpoints written before the rejected options were removed (issue 25) ----------------------
# The options and settings those checkpoints store, at the values that mean "off".
REMOVED_OFF = {
    "detail_channels": 0, "detail_size": 8, "noise_maps": False, "disc_channels": [],
    "adversarial_start": 0, "free_bits": 0.0,
}  # fmt: skip


def _as_written_before_issue_25(dst: Path, **used) -> None:
    """Rewrite config.json as the code before issue 25 saved it: the removed options at their off
    values (or as `used` gives them) and the two removed loss weights, with a matching hash."""
    meta = _meta(dst)
    config = meta["model_config"]
    config.update({**REMOVED_OFF, **used})
    config["loss_weights"] = {**config["loss_weights"], "detail_kl": 1e-3, "adversarial": 0.1}
    _write_meta(dst, meta)


def test_an_old_config_with_the_removed_options_off_loads_and_gives_the_same_outputs(saved, tmp_path):
    path, model, _, _ = saved
    dst = _copy(saved, tmp_path)
    _as_written_before_issue_25(dst)
    ck = load_checkpoint(dst)  # its config_sha256 is over the stored config, as before
    assert ck.config == model.config and ck.digest == checkpoint_digest(dst)
    a = load_checkpoint(path).generate([1, 2, 3], steps=5)  # (the fixture's model trains in another test)
    b = ck.generate([1, 2, 3], steps=5)
    assert a.captions == b.captions and np.array_equal(a.images, b.images) and np.array_equal(a.z, b.z)
    save_checkpoint(tmp_path / "resaved", ck.model, ck.tokenizer)  # saved again: today's config
    assert _meta(tmp_path / "resaved")["model_config"] == _meta(path)["model_config"]
    _make_legacy(dst)  # format 1 (no config hash) drops them the same way
    assert load_checkpoint(dst).config == model.config


@pytest.mark.parametrize(
    ("option", "value"), [("detail_channels", 4), ("noise_maps", True), ("disc_channels", [32, 64, 128]), ("free_bits", 0.1)]
)
def test_an_old_checkpoint_that_used_a_removed_option_is_refused_by_name(saved, tmp_path, option, value):
    dst = _copy(saved, tmp_path)
    _as_written_before_issue_25(dst, **{option: value})
    with pytest.raises(
        CheckpointError, match=rf"config\.json: model_config\.{option}=.* uses the {option} option, which was removed "
        r"from inkseed after an ablation rejected it \(docs/quality\.md keeps the record\)",
    ):  # fmt: skip
        load_checkpoint(dst)

"""ModelConfig presets, validation and dict round-trip; shapes of every preset."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS, ModelConfig, get_preset
from model.networks import JointModel

torch.set_num_threads(2)
VOCAB = 40


def test_presets_exist_and_roundtrip():
    assert {"tiny", "base", "large"} <= set(PRESETS)
    assert PRESETS["tiny"].image_size == 64
    assert PRESETS["base"].image_size == 128
    assert PRESETS["large"].image_size == 512 and PRESETS["large"].z_dim == 256
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_get_preset_is_a_copy():
    cfg = get_preset("tiny")
    cfg.loss_weights["kl"] = 123.0
    assert PRESETS["tiny"].loss_weights["kl"] != 123.0
    with pytest.raises(KeyError):
        get_preset("huge")


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 100},
        {"channels": (8, 8)},
        {"posterior_mix": (0.5, 0.5, 0.5)},
        {"loss_weights": {"nonsense": 1.0}},
        {"text_width": 30, "text_heads": 4},
    ],
)
def test_invalid_configs_raise(changes):
    with pytest.raises(ValueError):
        get_preset("tiny").replace(**changes)


def test_unknown_field_raises():
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "bogus": 1})
    # A removed loss term is unknown to a new config too (only the checkpoint loader drops old ones).
    with pytest.raises(ValueError, match=r"unknown loss weight\(s\): \['adversarial'\]"):
        get_preset("tiny").replace(loss_weights={"adversarial": 0.1})


@pytest.mark.parametrize("name,batch", [("tiny", 3), ("base", 2), ("large", 1)])
def test_forward_shapes(name, batch):
    cfg = get_preset(name)
    model = JointModel(cfg, VOCAB)
    s, d = cfg.image_size, cfg.z_dim
    images = torch.rand(batch, s, s) * 2 - 1
    tokens = torch.randint(4, VOCAB, (batch, cfg.max_caption_tokens))
    tokens[:, 0], tokens[:, -1] = 1, 2
    with torch.no_grad():
        mu, logvar = model.encode_posterior(images, tokens)
        assert mu.shape == logvar.shape == (batch, d)
        z = mu
        assert model.image_decoder(z).shape == (batch, s, s)
        logits = model.caption_decoder(z, tokens[:, :-1])
        assert logits.shape == (batch, cfg.max_caption_tokens - 1, VOCAB)
        out = model(images, tokens)
    for key in (
        "loss",
        "image_l1",
        "image_grad",
        "caption_ce",
        "kl",
        "contrastive",
        "image_mse",
        "caption_accuracy",
        "latent_mean",
        "latent_std",
        "latent_norm",
    ):
        assert key in out and out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert model.prior_loss(torch.randn(batch + 1, d)).dim() == 0
    if name != "large":  # one backward pass where it is cheap
        out = model.train()(images, tokens)
        out["loss"].backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("prior."))


@pytest.mark.slow  # the large preset's training steps at full size
def test_the_large_preset_trains_a_few_steps():
    """`large` (512 px, for GPUs) has the real-data design and its training step runs: two
    AdamW steps at batch 1 on the CPU, every trained part gets a gradient, the loss stays finite."""
    torch.manual_seed(0)
    cfg = get_preset("large")
    assert cfg.loss_weights["image_bce"] > 0 and cfg.loss_weights["image_l1"] == 0
    model = JointModel(cfg, VOCAB).train()
    params = [p for n, p in model.named_parameters() if not n.startswith("prior.")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = torch.rand(1, 512, 512) * 2 - 1
    tokens = torch.randint(4, VOCAB, (1, cfg.max_caption_tokens))
    tokens[:, 0], tokens[:, -1] = 1, 2
    for _ in range(2):
        out = model(images, tokens)
        assert torch.isfinite(out["loss"]) and "image_bce" in out
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is not None for p in params)

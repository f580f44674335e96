"""model/networks.py: shapes, the posterior modes, and golden numbers of a tiny seeded model.

The golden values (as diffusers keeps for its dummy components) were recorded from
`torch.manual_seed(0); JointModel(get_preset("tiny"), 20)` on fixed inputs: a silent change in
the math of any network (an init, a norm, an activation, a loss term) fails here, while a
change that keeps the math does not."""

from __future__ import annotations

import pytest
import torch

from model.config import get_preset
from model.networks import JointModel, product_of_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN_LOSSES = {
    "loss": 4.187266, "image_l1": 0.565221, "image_grad": 0.695816,
    "caption_ce": 2.835277, "kl": 8.930678, "contrastive": 0.82021,
}  # fmt: skip
GOLDEN_IMAGE = [-0.009739, -0.018198, 0.273177, 0.146298, 0.017519, 0.148106, -0.055955, 0.47546]
GOLDEN_LOGITS = [-0.037583, 0.004728, 0.104293, -0.148367, -0.019301, -0.091454]
GOLDEN_MU_IMAGE = [-0.035934, 0.070982, -0.159694, -0.086158]
GOLDEN_MU_CAPTION = [0.56532, -0.290578, 0.661846, -0.702688]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = JointModel(get_preset("tiny"), 20).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 64, 64, generator=g) * 2 - 1
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    z = torch.randn(2, model.config.z_dim, generator=g)
    return model, images, tokens, z


@torch.no_grad()
def test_golden_loss_terms(tiny) -> None:
    model, images, tokens, _ = tiny
    out = model(images, tokens)
    assert {k: round(float(out[k]), 6) for k in GOLDEN_LOSSES} == pytest.approx(GOLDEN_LOSSES, abs=TOL)


@torch.no_grad()
def test_golden_decoder_and_encoder_outputs(tiny) -> None:
    model, images, tokens, z = tiny
    img = model.image_decoder(z)
    assert img.shape == (2, 64, 64)
    assert img[0, ::16, ::16].flatten()[:8].tolist() == pytest.approx(GOLDEN_IMAGE, abs=TOL)
    assert float(img.mean()) == pytest.approx(0.083318, abs=TOL)
    logits = model.caption_decoder(z, tokens[:, :-1])
    assert logits.shape == (2, 5, 20)
    assert logits[1, 2, :6].tolist() == pytest.approx(GOLDEN_LOGITS, abs=TOL)
    assert model.encode_image(images)[0][0, :4].tolist() == pytest.approx(GOLDEN_MU_IMAGE, abs=TOL)
    assert model.encode_caption(tokens)[0][1, :4].tolist() == pytest.approx(GOLDEN_MU_CAPTION, abs=TOL)


@torch.no_grad()
def test_image_loss_is_the_weighted_image_part_of_the_loss(tiny) -> None:
    model, images, tokens, _ = tiny
    out = model(images, tokens)
    mu, _ = model.encode_posterior(images, tokens)
    w = model.config.loss_weights
    expected = w["image_l1"] * out["image_l1"] + w["image_grad"] * out["image_grad"]
    assert float(model.image_loss(model.image_decoder.logits(mu), images)) == pytest.approx(float(expected), abs=1e-6)


def test_product_of_experts_keeps_only_the_unmasked_expert() -> None:
    mu_a, mu_b = torch.full((1, 3), 2.0), torch.full((1, 3), -2.0)
    lv = torch.zeros(1, 3)
    only_a, _ = product_of_experts([mu_a, mu_b], [lv, lv], [torch.ones(1), torch.zeros(1)])
    both, _ = product_of_experts([mu_a, mu_b], [lv, lv], [torch.ones(1), torch.ones(1)])
    assert abs(float(both.abs().max())) < abs(float(only_a.abs().max()))  # the prior expert pulls to 0
    assert torch.all(only_a > 0) and torch.allclose(both, torch.zeros(1, 3), atol=1e-6)


def test_caption_decoding_with_a_kv_cache_matches_the_full_forward(tiny) -> None:
    model, _, tokens, z = tiny
    with torch.no_grad():
        full = model.caption_decoder(z, tokens[:, :-1])  # (B, T, V)
        logits, cache = model.caption_decoder.start(z)
        steps = [logits]
        for pos in range(1, tokens.shape[1] - 1):
            logits, cache = model.caption_decoder.step(tokens[:, pos], pos, cache)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


def _wide(model: JointModel, widths: tuple[int, ...]) -> JointModel:
    """A model with decoder_widths = widths holding `model`'s weights (the wide blocks stay at their init)."""
    wide = JointModel(model.config.replace(decoder_widths=widths), model.vocab_size)
    missing, unexpected = wide.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("image_decoder.wide.") for k in missing), missing
    return wide.eval()


def test_wide_blocks_start_as_the_identity_then_learn(tiny) -> None:
    """decoder_widths adds zero-init wide blocks, keyed by stage, without renaming any other weight."""
    model, images, tokens, z = tiny
    wide = _wide(model, (0, 0, 32, 32, 16))
    assert sorted(wide.image_decoder.wide) == ["2", "3", "4"] and wide.config.decoder_widths == (0, 0, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(wide.decode_image(z), model.decode_image(z))
    wide.train()(images, tokens)["loss"].backward()
    last = wide.image_decoder.wide["4"].net[-1].weight
    assert last.grad is not None and last.grad.abs().sum() > 0, "the zero-init conv must get a gradient"
    with torch.no_grad():
        last.add_(0.05)
        assert (wide.eval().decode_image(z) - model.decode_image(z)).abs().max() > 1e-3


def test_a_wide_checkpoint_round_trips_and_bad_widths_are_named(tmp_path) -> None:
    from model.checkpoint import load_checkpoint, save_checkpoint

    from builders import scrambled_tiny

    wide, tok = scrambled_tiny(["a line drawing of a cat", "a line drawing of a dog"], decoder_widths=(0, 0, 0, 16, 16))
    with torch.no_grad():
        wide.image_decoder.wide["3"].net[-1].weight.normal_(0, 0.05)
    save_checkpoint(tmp_path / "wide", wide, tok)
    back = load_checkpoint(tmp_path / "wide")
    assert back.config.decoder_widths == (0, 0, 0, 16, 16)
    z = torch.randn(2, wide.config.z_dim)
    with torch.no_grad():
        assert torch.equal(back.model.decode_image(z), wide.decode_image(z))
    with pytest.raises(ValueError, match="decoder_widths needs one width >= 0 per entry of channels"):
        get_preset("tiny").replace(decoder_widths=(16, 16))


@pytest.mark.parametrize("r", [2, 4])
def test_a_pixel_shuffle_model_trains_round_trips_and_is_batch_invariant(tmp_path, r) -> None:
    """pixel_shuffle r: the decoder's convs stop at image_size / r and a sub-pixel conv (plus the
    gated full-resolution textures) paints each r x r block; the encoder starts with the inverse."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    from builders import scrambled_tiny

    size = get_preset("tiny").image_size
    tiny_channels = get_preset("tiny").channels
    channels = tiny_channels[: len(tiny_channels) - (r.bit_length() - 1)]  # log2(r) fewer conv stages
    model, tok = scrambled_tiny(["a line drawing of a cat", "a line drawing of a dog"], pixel_shuffle=r, channels=channels)
    assert model.image_encoder.stem.in_channels == r * r and model.image_decoder.out.out_channels == r * r
    images = torch.rand(4, size, size) * 2 - 1
    tokens = torch.randint(4, model.vocab_size, (4, 8))
    model.train()
    loss = model(images, tokens)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.image_decoder.textures.grad.abs().sum() > 0  # the textures learn
    model.eval()
    z = torch.randn(5, model.config.z_dim)
    with torch.no_grad():
        out = model.decode_image(z)
        assert out.shape == (5, size, size) and out.abs().max() <= 1
        assert torch.allclose(model.decode_image(z[2:3]), out[2:3], atol=1e-4)  # rows independent (GroupNorm)
        save_checkpoint(tmp_path / "ps", model, tok)
        back = load_checkpoint(tmp_path / "ps")
        assert back.config.pixel_shuffle == r and torch.equal(back.model.decode_image(z), out)
    with pytest.raises(ValueError, match="pixel_shuffle must be a power of two"):
        get_preset("tiny").replace(pixel_shuffle=3)
    with pytest.raises(ValueError, match=r"channels needs log2\(64/2/4\)\+1 = 4 entries"):
        get_preset("tiny").replace(pixel_shuffle=2)

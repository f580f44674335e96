"""model/onnx_sampler.py: its numpy ports of the torch pieces of generate() equal the originals
(the seed noise, the DDIM timesteps, the repeat block, the tokenizer, the uint8 conversion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import onnx_sampler, tokenizer
from model.decoding import repeat_mask
from model.images import to_float, to_uint8
from model.tokenizer import CaptionTokenizer

CAPTIONS = ["a print of a ship at sea, at night.", "woman: woman (a study)", "the moon; over the hills!"]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 + 7, 2**63 - 1, -3])
def test_torch_randn_is_torchs_cpu_generator(seed: int) -> None:
    for n in (16, 17, 100, 5616):  # whole blocks of 16, and tails
        expected = torch.randn(n, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_allclose(onnx_sampler.torch_randn(seed, n), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=">= 16"):
        onnx_sampler.torch_randn(seed, 15)


def test_ddim_taus_are_torchs_linspace() -> None:
    for timesteps, steps in [(1000, s) for s in range(1, 1001)] + [(4000, s) for s in (7, 2208, 2294, 4000)]:
        expected = torch.linspace(timesteps - 1, 0, steps).round().long().tolist()
        assert onnx_sampler.ddim_taus(timesteps, steps) == expected, (timesteps, steps)
    assert onnx_sampler.ddim_taus(1000, 5000) == onnx_sampler.ddim_taus(1000, 1000)  # capped, as the prior


def test_repeat_mask_is_decodings() -> None:
    g = torch.Generator().manual_seed(0)
    punctuation = torch.zeros(12, dtype=torch.bool)
    punctuation[[0, 1, 2, 3, 10, 11]] = True
    for _ in range(200):
        seqs = torch.randint(4, 12, (5, 10), generator=g)  # few words: repeats are frequent
        seqs[:, 0] = tokenizer.BOS_ID
        pos = int(torch.randint(1, 10, (1,), generator=g))
        for punct in (punctuation, None):
            expected = repeat_mask(seqs, pos, 12, 3, punct).numpy()
            got = onnx_sampler.repeat_mask(seqs.numpy(), pos, 12, 3, None if punct is None else punct.numpy())
            np.testing.assert_array_equal(got, expected)


def test_the_tokenizer_port_encodes_and_decodes_as_caption_tokenizer(tmp_path) -> None:
    assert (onnx_sampler.PAD_ID, onnx_sampler.BOS_ID, onnx_sampler.EOS_ID, onnx_sampler.UNK_ID) == (
        tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.UNK_ID,
    )  # fmt: skip
    assert onnx_sampler.SPECIALS == tokenizer.SPECIALS
    tok = CaptionTokenizer.train(CAPTIONS)
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    port = onnx_sampler.Captions(tmp_path / "tokenizer.json")
    texts = [*CAPTIONS, "an unknown [EOS] word", "a ship " * 20]
    expected = tok.encode(texts, 12)
    np.testing.assert_array_equal(port.encode(texts, 12), expected.numpy())
    rows = torch.randint(0, tok.vocab_size, (20, 12), generator=torch.Generator().manual_seed(1))
    assert port.decode(rows.numpy()) == tok.decode(rows)
    assert port.decode(expected.numpy()) == tok.decode(expected)


def test_uint8_conversion_is_model_images() -> None:
    x = torch.linspace(-1.2, 1.2, 2001).reshape(1, -1)
    np.testing.assert_array_equal(onnx_sampler.to_uint8(x.numpy()), to_uint8(x))
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(onnx_sampler.to_float(u), to_float(u).numpy())

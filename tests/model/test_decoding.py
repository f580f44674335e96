"""model/decoding.py: the loop block (immediate repeats, repeated n-grams) in greedy decoding."""

from __future__ import annotations

import torch

from model.decoding import decode_tokens, repeat_mask
from model.tokenizer import BOS_ID, EOS_ID

from builders import scrambled_tiny

CAPTIONS = ["a line drawing of a fox face", "a line drawing of a grinning face", "a line drawing of a red apple"]


def test_repeat_mask_bans_immediate_repeats_and_repeated_trigrams() -> None:
    seqs = torch.tensor([[BOS_ID, 5, 6, 7, 5, 6, 0, 0]])
    banned = repeat_mask(seqs, 6, 10, 3)[0]  # next after "... 5 6": 7 would repeat "5 6 7"
    assert banned.nonzero().flatten().tolist() == [6, 7]  # 6 (immediate) and 7 (the trigram)
    assert not banned[EOS_ID] and not repeat_mask(seqs, 6, 10, 0).any()
    # "woman : woman": with 9 marked as punctuation, the word before it is banned too.
    punctuation = torch.zeros(10, dtype=torch.bool)
    punctuation[9] = True
    seqs = torch.tensor([[BOS_ID, 4, 5, 9, 0]])
    assert repeat_mask(seqs, 4, 10, 3, punctuation)[0].nonzero().flatten().tolist() == [5, 9]
    assert repeat_mask(seqs, 4, 10, 3)[0].nonzero().flatten().tolist() == [9]


def test_greedy_decoding_never_loops_even_when_the_model_wants_to() -> None:
    """A caption decoder that always prefers the same word ("mime mime mime") must still give a
    caption without an immediate repeat or a repeated trigram, deterministically."""

    model, _ = scrambled_tiny(CAPTIONS)
    dec = model.caption_decoder
    head = torch.nn.Linear(dec.lm_head.in_features, dec.lm_head.out_features)  # untied, with a bias
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[7], head.bias[8] = 50.0, 40.0  # token 7 wins every step, then token 8
    dec.lm_head = head
    with torch.no_grad():
        z = torch.zeros(2, model.config.z_dim)
        looping = decode_tokens(model, z, no_repeat_ngram=0)
        blocked = decode_tokens(model, z)
    assert (looping[0, 1:4] == 7).all()  # without the block: "mime mime mime"
    words = [t for t in blocked[0].tolist() if t > 3]
    assert all(a != b for a, b in zip(words, words[1:]))
    trigrams = list(zip(words, words[1:], words[2:]))
    assert len(trigrams) == len(set(trigrams))
    assert torch.equal(blocked, decode_tokens(model, z))

"""CaptionTokenizer: special ids, encode/decode round-trip, truncation, JSON round-trip."""

from __future__ import annotations

import random

import torch

from model.tokenizer import CaptionTokenizer

CAPTIONS = [
    "an engraving of a windmill on the hills, on the left, under a crescent moon at night, with three birds",
    "at dusk, a print of a sailing ship at sea, in the middle",
    "an etching of an oak tree in a field, to the right, by day",
]


def _grammar_captions(n=200):
    try:
        from pipeline.data.grammar import make_caption, sample_attributes
    except ImportError:
        return CAPTIONS
    rng = random.Random(0)
    return [make_caption(sample_attributes(rng), rng) for _ in range(n)]


def test_specials_and_roundtrip():
    caps = _grammar_captions()
    tok = CaptionTokenizer.train(caps)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size < 200
    ids = tok.encode(caps, 32)
    assert ids.shape == (len(caps), 32) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_id).all()
    assert tok.decode(ids) == caps
    for row, cap in zip(ids, caps):
        n = len(tok.tokenize(cap))
        assert row[n + 1] == tok.eos_id and (row[n + 2 :] == tok.pad_id).all()


def test_case_unknown_and_truncation():
    tok = CaptionTokenizer.train(CAPTIONS)
    assert tok.decode(tok.encode(["An ENGRAVING of a Ship"], 16)) == ["an engraving of a ship"]
    ids = tok.encode(["a zeppelin at sea"], 16)
    assert tok.unk_id in ids[0].tolist()
    long = tok.encode([CAPTIONS[0]], 6)[0]
    assert long.tolist()[0] == tok.bos_id and long.tolist()[-1] == tok.eos_id
    assert tok.decode(long[None])[0] == " ".join(CAPTIONS[0].split()[:4])


def test_json_roundtrip():
    tok = CaptionTokenizer.train(CAPTIONS)
    again = CaptionTokenizer.from_json(tok.to_json())
    assert again == tok and again.vocab_size == tok.vocab_size
    assert torch.equal(again.encode(CAPTIONS, 32), tok.encode(CAPTIONS, 32))


def test_special_token_spellings_in_a_caption_are_ordinary_text():
    """"[EOS]" typed in a caption must not end it, "[PAD]" must not pad it: each tokenizes as
    "[", the lowercased word, "]" (ids when known, [UNK] otherwise), trained or reloaded."""
    tok = CaptionTokenizer.train(CAPTIONS + ["a ship [at] sea"])  # "[", "]" and "at" are words
    for t in (tok, CaptionTokenizer.from_json(tok.to_json())):
        ids = t.tokenize("a ship [EOS] at sea [PAD] [BOS] [UNK]")
        assert not {t.pad_id, t.bos_id, t.eos_id} & set(ids)
        vocab = t.vocab
        assert ids[:5] == [vocab["a"], vocab["ship"], vocab["["], t.unk_id, vocab["]"]]  # "eos" is unknown
        row = t.encode(["a ship [EOS] at sea"], 16)[0].tolist()
        assert row.index(t.eos_id) == 1 + len(t.tokenize("a ship [EOS] at sea"))  # eos only at the end
        assert t.decode([row])[0] == "a ship [ [UNK] ] at sea"  # decode drops no word
        assert t.tokenize("[at]") == [vocab["["], vocab["at"], vocab["]"]]

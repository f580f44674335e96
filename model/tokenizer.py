"""Caption tokenizer: word level, built with the `tokenizers` library, saved as its JSON string.

Specials have fixed ids: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3. Text is lowercased and split on
whitespace and punctuation. `encode` gives `bos w1 ... wn eos pad ...` of a fixed length;
`decode` stops at the first eos and drops specials.

Only `encode` places specials. A special's spelling typed in a caption ("[EOS]", "[PAD]", ...) is
ordinary text: it is split like any other, into "[", the word ("eos", lowercased) and "]", each
its vocabulary id or [UNK]. So a caption can never end itself early or smuggle padding in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIALS = (PAD, BOS, EOS, UNK)
# Their ids, fixed by their order in SPECIALS: the networks use these (model/networks.py).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))

# Whitespace pre-tokenization splits "moon." into "moon" "."; decode glues punctuation back.
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?)])")
_SPACE_AFTER_OPEN = re.compile(r"([(]) ")
_COMMA_WITHOUT_SPACE = re.compile(r",(?=\S)")


def canonical_caption(text: str) -> str:
    """The one caption normaliser: the spelling under which two captions count as the same text.
    Case, runs of whitespace, a word tokenizer's " ," and " .", a missing space after a comma and a
    final period do not count. The grammar parser, the evaluation's verbatim checks (distinct,
    novel) and the free-form metrics all compare captions through it."""
    text = " ".join(text.lower().split()).replace(" ,", ",").replace(" .", ".")
    return _COMMA_WITHOUT_SPACE.sub(", ", text).removesuffix(".").strip()


class CaptionTokenizer:
    """Word-level caption tokenizer with fixed special ids (see module docstring)."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, tokenizer: Tokenizer) -> None:
        for i, tok in enumerate(SPECIALS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}, got {tokenizer.token_to_id(tok)}")
        # Specials in the input text are text (module docstring). A runtime switch of `tokenizers`,
        # not saved in its JSON: set on every tokenizer built here, trained or loaded.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._punctuation: torch.Tensor | None = None  # punctuation_mask(), made on first use

    @classmethod
    def train(cls, captions: Iterable[str], min_frequency: int = 1) -> CaptionTokenizer:
        """Build the vocabulary from training captions (specials first, then by frequency)."""
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(
            special_tokens=list(SPECIALS), min_frequency=min_frequency, show_progress=False
        )
        tok.train_from_iterator(list(captions), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def punctuation_mask(self) -> torch.Tensor:
        """(V,) bool: the ids that are not words (punctuation, and the specials). Decoding looks
        through them for an immediate word repeat ("woman: woman" is one)."""
        if self._punctuation is None:  # once per tokenizer: decoding asks for it every batch
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            for token, i in self.vocab.items():
                mask[i] = token in SPECIALS or not any(ch.isalnum() for ch in token)
            self._punctuation = mask
        return self._punctuation

    def tokenize(self, text: str) -> list[int]:
        """Word ids of one caption, without bos/eos/padding."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode(self, texts: str | Sequence[str], max_len: int = 32) -> torch.Tensor:
        """(B, max_len) int64: bos, words (truncated so eos always fits), eos, pad."""
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 3:
            raise ValueError("max_len must be >= 3")
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id, *enc.ids[: max_len - 2], self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int]) -> list[str]:
        """Captions of a (B, T) batch (or one (T,) row): stops at eos, skips specials."""
        if isinstance(ids, torch.Tensor):
            rows = ids.tolist() if ids.dim() == 2 else [ids.tolist()]
        else:
            rows = list(ids)
            if rows and isinstance(rows[0], int):
                rows = [rows]
        texts = []
        for row in rows:
            words = []
            for i in row:
                i = int(i)
                if i == self.eos_id:
                    break
                if i in (self.pad_id, self.bos_id):
                    continue
                words.append(self._tok.id_to_token(i) or UNK)
            text = " ".join(words)
            text = _SPACE_AFTER_OPEN.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
            texts.append(text)
        return texts

    def normalize(self, text: str) -> str:
        """The caption as it round-trips (lowercased, whitespace collapsed)."""
        return self.decode([self.tokenize(text)])[0]

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(s))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CaptionTokenizer) and self.vocab == other.vocab

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size})"

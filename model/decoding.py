"""Caption decoding from z: greedy, seeded draws and beam search, with a KV cache and a loop block.

Greedy decoding is deterministic; a draw (temperature > 0) continues the seed's own generator.
Every mode blocks degenerate loops: no word right after itself (looking through punctuation) and
no repeated n-gram (`repeat_mask`, like transformers' no_repeat_ngram_size).
"""

from __future__ import annotations

import torch

from model.networks import JointModel
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# Captions never repeat a word immediately ("mime mime") nor any n-gram of this many words: the
# degenerate loops of a decoder unsure of its caption (transformers' no_repeat_ngram_size).
NO_REPEAT_NGRAM = 3


def repeat_mask(
    seqs: torch.Tensor, pos: int, vocab: int, n: int, punctuation: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, V) bool: the tokens that would, at position `pos` of seqs (N, L), repeat the previous
    word or complete an n-gram already in seqs[:, :pos]. `punctuation` (V,) bool marks the ids
    that are not words: the previous word is looked for through them ("woman : woman" repeats).
    n <= 1 bans nothing."""
    banned = torch.zeros(seqs.shape[0], vocab, dtype=torch.bool, device=seqs.device)
    if n <= 1 or pos < 2:  # position 1 follows bos only
        return banned
    rows = torch.arange(seqs.shape[0], device=seqs.device)
    prefix = seqs[:, :pos]  # (N, pos)
    # 1. An immediate repeat of the last token, or of the last word through punctuation.
    banned[rows, prefix[:, -1]] = True
    if punctuation is not None:
        is_word = ~punctuation.to(seqs.device)[prefix]  # (N, pos)
        last = pos - 1 - is_word.flip(1).int().argmax(1)  # (N,) index of the last word
        found = is_word.any(1)
        banned[rows[found], prefix[rows[found], last[found]]] = True
    # 2. The last n-1 tokens again followed by what followed them before.
    if pos >= n:
        windows = prefix.unfold(1, n, 1)  # (N, W, n)
        match = (windows[:, :, :-1] == seqs[:, None, pos - n + 1 : pos]).all(-1)  # (N, W)
        r, w = match.nonzero(as_tuple=True)
        banned[r, windows[r, w, -1]] = True
    banned[:, EOS_ID] = False  # ending is always allowed
    return banned


def _choose(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    generators: list[torch.Generator] | None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the row's own generator; `banned` (B, V) tokens
    are never picked."""
    logits = logits.float()
    logits[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")  # never emitted by the decoder
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if temperature <= 0 or generators is None:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def decode_tokens(
    model: JointModel,
    z: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    generators: list[torch.Generator] | None = None,
    beams: int = 1,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    punctuation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Autoregressive decoding with a KV cache: z (B, D) -> tokens (B, T) = bos w... eos pad.

    Greedy (deterministic), a seeded draw (temperature > 0, per-row generators) or beam search
    (beams > 1). All three block repeats: no word right after itself and no repeated n-gram of
    `no_repeat_ngram` words (0 turns it off; see `repeat_mask`; `punctuation`: the tokenizer's
    `punctuation_mask()`, so that a word repeated across a comma counts too)."""
    if beams > 1 and temperature <= 0:
        return _beam_search(model, z, beams, no_repeat_ngram, punctuation)
    dec = model.caption_decoder
    b, max_len = z.shape[0], dec.max_len
    tokens = torch.full((b, max_len), PAD_ID, dtype=torch.long, device=z.device)
    tokens[:, 0] = BOS_ID
    done = torch.zeros(b, dtype=torch.bool, device=z.device)
    logits, cache = dec.start(z)  # 1. prefill prefix + bos
    for pos in range(1, max_len):
        banned = repeat_mask(tokens, pos, logits.shape[-1], no_repeat_ngram, punctuation)
        nxt = _choose(logits, temperature, top_k, generators, banned)  # 2. pick the next word
        if pos == max_len - 1:
            nxt = torch.full_like(nxt, EOS_ID)  # out of room: close the caption
        tokens[:, pos] = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        done = done | (nxt == EOS_ID)
        if bool(done.all()):
            break
        logits, cache = dec.step(nxt, pos, cache)  # 3. one cached step
    return tokens


def _beam_search(
    model: JointModel, z: torch.Tensor, beams: int, no_repeat_ngram: int, punctuation: torch.Tensor | None
) -> torch.Tensor:
    """Beam search (sum of log-probs, finished beams kept); each row searched independently."""
    dec = model.caption_decoder
    b, max_len, k = z.shape[0], dec.max_len, beams
    logits, cache = dec.start(z)
    logp = logits.float().log_softmax(-1)
    logp[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
    v = logp.shape[-1]
    scores, first = logp.topk(k, dim=-1)  # (B, K)
    seqs = torch.full((b, k, max_len), PAD_ID, dtype=torch.long, device=z.device)
    seqs[:, :, 0] = BOS_ID
    seqs[:, :, 1] = first
    done = first == EOS_ID  # (B, K)
    cache = [(kk.repeat_interleave(k, 0), vv.repeat_interleave(k, 0)) for kk, vv in cache]
    last = first.reshape(-1)
    for pos in range(2, max_len):
        if bool(done.all()):
            break
        logits, cache = dec.step(last, pos - 1, cache)
        logp = logits.float().log_softmax(-1)
        logp = logp.masked_fill(repeat_mask(seqs.view(b * k, max_len), pos, v, no_repeat_ngram, punctuation), float("-inf"))
        logp = logp.view(b, k, v)
        logp[..., [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        if pos == max_len - 1:
            logp = torch.where(
                torch.arange(v, device=z.device) == EOS_ID, logp, torch.full_like(logp, float("-inf"))
            )
        # finished beams continue only with pad at no cost
        pad_row = torch.full((v,), float("-inf"), device=z.device)
        pad_row[PAD_ID] = 0.0
        logp = torch.where(done[..., None], pad_row, logp)
        cand = (scores[..., None] + logp).view(b, k * v)
        scores, idx = cand.topk(k, dim=-1)  # (B, K)
        src, tok = idx // v, idx % v
        seqs = torch.gather(seqs, 1, src[..., None].expand(-1, -1, max_len)).clone()
        seqs[:, :, pos] = tok
        done = torch.gather(done, 1, src) | (tok == EOS_ID)
        flat_src = (src + torch.arange(b, device=z.device)[:, None] * k).reshape(-1)
        cache = [(kk[flat_src], vv[flat_src]) for kk, vv in cache]
        last = tok.reshape(-1)
    return seqs[:, 0]

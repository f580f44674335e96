"""The caption networks: a pre-norm transformer block, the bidirectional caption encoder and the
GPT-style caption decoder that reads z as prefix tokens (with a KV cache for decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.tokenizer import BOS_ID, PAD_ID

LOGVAR_MIN, LOGVAR_MAX = -12.0, 6.0


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, L, W); key_mask (B, L_k) True = attend; cache = past (k, v) of (B, H, L_past, Dh)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B,H,L,Dh)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        # With a cache, the new queries are the latest positions: they may see every key.
        is_causal = causal and cache is None and n > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, n, w)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, causal=False, key_mask=None, cache=None):
        a, new_cache = self.attn(self.ln1(x), causal=causal, key_mask=key_mask, cache=cache)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, new_cache


class CaptionEncoder(nn.Module):
    """(B, T) tokens -> bidirectional transformer -> masked mean pool (B, W) -> (mu, logvar)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(vocab_size, w)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(cfg.max_caption_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(
            Block(w, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_encoder_layers)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 2 * cfg.z_dim)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = tokens != PAD_ID  # (B, T)
        x = self.embed(tokens) + self.pos[:t]  # (B, T, W)
        for block in self.blocks:
            x, _ = block(x, key_mask=mask)
        x = self.norm(x)
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)  # (B, W)

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(feats).float().chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class CaptionDecoder(nn.Module):
    """GPT-style causal decoder; z becomes `prefix_tokens` tokens in front of the caption."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        w, p = cfg.text_width, cfg.prefix_tokens
        self.p, self.w, self.max_len = p, w, cfg.max_caption_tokens
        self.prefix = nn.Linear(cfg.z_dim, p * w)
        self.embed = nn.Embedding(vocab_size, w)
        self.pos = nn.Parameter(torch.randn(p + cfg.max_caption_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(w)
        self.lm_head = nn.Linear(w, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: a small vocab, fewer params
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2 init: unit-scale logits at start

    def _prefix(self, z: torch.Tensor) -> torch.Tensor:
        return self.prefix(z).view(z.shape[0], self.p, self.w)  # (B, P, W)

    def forward(self, z: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: z (B, D), tokens_in (B, T) = bos w1 ... -> logits (B, T, V)."""
        t = tokens_in.shape[1]
        x = torch.cat([self._prefix(z), self.embed(tokens_in)], dim=1) + self.pos[: self.p + t]  # (B, P+T, W)
        for block in self.blocks:
            x, _ = block(x, causal=True)
        return self.lm_head(self.norm(x[:, self.p :]))  # (B, T, V)

    def start(self, z: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Prefill prefix + bos; returns logits for the first word (B, V) and the KV cache."""
        b = z.shape[0]
        bos = torch.full((b, 1), BOS_ID, dtype=torch.long, device=z.device)
        x = torch.cat([self._prefix(z), self.embed(bos)], dim=1) + self.pos[: self.p + 1]
        cache = []
        for block in self.blocks:
            x, kv = block(x, causal=True)
            cache.append(kv)
        return self.lm_head(self.norm(x[:, -1])), cache

    def step(self, token: torch.Tensor, pos: int, cache: list) -> tuple[torch.Tensor, list]:
        """One decoding step: token (B,) at caption position pos -> logits (B, V), new cache."""
        x = self.embed(token)[:, None] + self.pos[self.p + pos]  # (B, 1, W)
        new_cache = []
        for block, kv in zip(self.blocks, cache):
            x, kv = block(x, cache=kv)
            new_cache.append(kv)
        return self.lm_head(self.norm(x[:, -1])), new_cache



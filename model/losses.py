"""Loss terms of the joint model (each returned unweighted; JointModel.forward weights them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between finite differences along x and y of (B, H, W) images: a sharpness term.

    Thin hatching lines are mostly gradient; plain L1 lets a decoder trade them for gray.
    """
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def caption_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy ignoring pad, and token accuracy: logits (B, T, V), target (B, T)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=pad_id)
    with torch.no_grad():
        keep = target != pad_id
        acc = ((logits.argmax(-1) == target) & keep).sum() / keep.sum().clamp_min(1)
    return ce, acc.float()


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) of (B, D) posteriors, summed over dims, mean over batch."""
    kl_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # (B, D)
    return kl_dim.mean(0).sum()


def info_nce(
    img_emb: torch.Tensor, cap_emb: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) between unit embeddings (B, E); matching pairs on the diagonal.

    positives (B, B) bool marks extra matching pairs (e.g. identical captions, frequent in a
    procedural grammar): the target spreads uniformly over them instead of calling them negatives.
    """
    logits = scale * img_emb @ cap_emb.t()  # (B, B)
    b = img_emb.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=img_emb.device)
    pos = eye if positives is None else (positives | eye)
    target = pos.float() / pos.sum(1, keepdim=True)  # (B, B), rows sum to 1
    target_t = pos.t().float() / pos.t().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target_t))

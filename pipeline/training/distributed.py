"""Collectives the training loop needs, written so that one worker (no process group) works too."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group of more than one worker."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_means(sums: dict[str, torch.Tensor], n: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means over every worker of per-worker sums (keys sorted: same order
    on every rank)."""
    keys = sorted(sums)
    packed = torch.stack([*(sums[k] for k in keys), torch.tensor(float(n), device=device)])
    if is_distributed():
        dist.all_reduce(packed)
    total = max(packed[-1].item(), 1.0)
    return {k: packed[i].item() / total for i, k in enumerate(keys)}


def all_gather_counts(n: int, device: torch.device) -> list[int]:
    """Every worker's count, in rank order."""
    if not is_distributed():
        return [n]
    out = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(n, dtype=torch.long, device=device))
    return [int(t) for t in out]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_r, D) tensors of every rank in rank order (n_r may differ)."""
    if not is_distributed():
        return x
    counts = all_gather_counts(x.shape[0], x.device)
    padded = torch.zeros((max(counts), x.shape[1]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([t[:c] for t, c in zip(out, counts)])

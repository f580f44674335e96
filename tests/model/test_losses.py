"""model/losses.py on cases whose value is known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import caption_cross_entropy, gradient_l1, info_nce, kl_to_standard_normal


def test_gradient_l1_is_zero_for_a_shifted_copy_and_sees_lost_lines() -> None:
    target = torch.zeros(1, 8, 8)
    target[:, :, 4] = 1.0  # one vertical line
    assert gradient_l1(target + 0.25, target).item() == pytest.approx(0.0, abs=1e-7)  # same gradients
    blurred = torch.full_like(target, 1 / 8)  # the line smeared into gray
    # dx of the line: +1 then -1 in each of 8 rows over 8x7 differences; dy: none.
    assert gradient_l1(blurred, target).item() == pytest.approx(0.5 * (16 / 56), rel=1e-6)


def test_caption_cross_entropy_ignores_padding() -> None:
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # certain of tokens 2 and 3
    logits[0, 2, :] = 0.0  # uniform over 4 at a padded position
    ce, acc = caption_cross_entropy(logits, torch.tensor([[2, 3, 0]]), pad_id=0)
    assert ce.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0
    ce, acc = caption_cross_entropy(logits, torch.tensor([[2, 1, 0]]), pad_id=0)
    assert ce.item() == pytest.approx(1e4 / 2, rel=1e-3) and acc.item() == 0.5


def test_kl_of_the_prior_itself_is_zero() -> None:
    assert kl_to_standard_normal(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0
    kl = kl_to_standard_normal(torch.ones(2, 3), torch.zeros(2, 3))
    assert kl.item() == pytest.approx(1.5)  # 0.5 * mu^2 per dim, 3 dims, mean over the batch
    kl = kl_to_standard_normal(torch.zeros(2, 1), torch.log(torch.tensor([[4.0], [1.0]])))
    assert kl.item() == pytest.approx(0.25 * (4 - 1 - float(torch.log(torch.tensor(4.0)))))


def test_info_nce_rewards_matching_pairs_and_counts_duplicate_captions_as_positives() -> None:
    e = torch.eye(4)
    right = info_nce(e, e, torch.tensor(10.0))
    wrong = info_nce(e, e.roll(1, 0), torch.tensor(10.0))
    assert right < 0.01 < wrong
    same = torch.ones(4, 4, dtype=torch.bool)  # every caption identical: no negatives at all
    flat = info_nce(torch.ones(4, 4) / 2, torch.ones(4, 4) / 2, torch.tensor(10.0), same)
    assert flat.item() == pytest.approx(math.log(4), rel=1e-5)  # uniform target, uniform logits

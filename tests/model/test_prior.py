"""model/prior.py: the schedule, standardization, the loss and DDIM sampling."""

from __future__ import annotations

import pytest
import torch

from model.prior import LatentPrior, cosine_alphas_cumprod


def test_cosine_schedule_runs_from_signal_to_noise() -> None:
    ab = cosine_alphas_cumprod(1000)
    assert ab.shape == (1000,) and ab[0] > 0.999 and ab[-1] < 1e-3
    assert torch.all(ab[1:] <= ab[:-1])  # monotone: every step adds noise


def test_standardization_round_trips_and_is_identity_until_fitted() -> None:
    prior = LatentPrior(z_dim=4, width=16, depth=1)
    z = torch.randn(8, 4)
    assert torch.equal(prior.standardize(z), z)
    prior.fit_latent_stats(z * 3 + 2)
    assert torch.allclose(prior.destandardize(prior.standardize(z)), z, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N>=2, 4\)"):
        prior.fit_latent_stats(torch.randn(1, 4))


def test_ddim_is_deterministic_per_row_whatever_the_batch() -> None:
    torch.manual_seed(0)
    prior = LatentPrior(z_dim=6, width=32, depth=2)
    torch.nn.init.normal_(prior.out.weight, std=0.1)  # a non-trivial eps prediction
    noise = torch.randn(5, 6)
    all_rows = prior.sample(noise, steps=10)
    one_row = prior.sample(noise[3:4], steps=10)
    assert torch.allclose(all_rows[3:4], one_row, atol=1e-6)
    assert torch.equal(prior.sample(noise, steps=10), all_rows)


def test_a_few_steps_of_training_lower_the_loss() -> None:
    torch.manual_seed(0)
    prior = LatentPrior(z_dim=2, width=32, depth=2, timesteps=100)
    data = torch.randn(256, 2) * torch.tensor([0.1, 1.0]) + torch.tensor([1.0, -1.0])  # a narrow Gaussian
    prior.fit_latent_stats(data)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = prior.loss(data, gen).item()
    for _ in range(300):
        loss = prior.loss(data, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert prior.loss(data, torch.Generator().manual_seed(1)).item() < 0.8 * first
    samples = prior.sample(torch.randn(512, 2, generator=torch.Generator().manual_seed(2)), steps=25)
    # Sampled z land where the data are: the standardization brings each dim's scale back.
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.5)
    assert samples[:, 0].std() < 0.3 * samples[:, 1].std()

"""The objectives (paper, section 4.3 and appendix D.3): gradients of the losses and the advantage statistics."""

import numpy as np
import pytest
import torch
from conftest import sd14_scheduler

import ddpo
from machinery.config import ALGOS

from ddpo import PerPromptStatTracker, batch_advantages, ddpo_is_loss, ddpo_sf_loss, diagnostics
from sampler import step_with_logprob

CLIP = 1e-4


def grad_of(loss_fn, log_prob):
    log_prob = log_prob.clone().requires_grad_(True)
    loss_fn(log_prob).backward()
    return log_prob.grad


@pytest.mark.math
def test_clipped_loss_has_reinforce_gradient_at_ratio_one():
    log_prob, advantages = torch.randn(6), torch.randn(6)
    is_grad = grad_of(lambda lp: ddpo_is_loss(lp, log_prob, advantages, CLIP, 5.0), log_prob)
    sf_grad = grad_of(lambda lp: ddpo_sf_loss(lp, advantages, 5.0), log_prob)
    torch.testing.assert_close(is_grad, sf_grad)
    torch.testing.assert_close(sf_grad, -advantages / 6)


@pytest.mark.math
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_loss_gradient_is_zero_past_the_clip_in_the_favoured_direction(sign):
    """A > 0 and ratio > 1 + eps, or A < 0 and ratio < 1 - eps: no more push that way."""
    old_log_prob, advantages = torch.zeros(4), sign * torch.rand(4).add(0.1)
    log_prob = old_log_prob + sign * 10 * CLIP  # ratio ~ 1 +- 1e-3, well past the clip
    assert (
        grad_of(lambda lp: ddpo_is_loss(lp, old_log_prob, advantages, CLIP, 5.0), log_prob)
        .abs()
        .max()
        == 0
    )
    # pushed past the clip the other way, the gradient still pulls back
    against = grad_of(
        lambda lp: ddpo_is_loss(lp, old_log_prob, advantages, CLIP, 5.0),
        old_log_prob - sign * 10 * CLIP,
    )
    assert (against.abs() > 0).all()


@pytest.mark.math
def test_advantages_are_clipped_in_both_losses():
    log_prob, advantages = torch.zeros(2), torch.tensor([50.0, -50.0])
    torch.testing.assert_close(
        grad_of(lambda lp: ddpo_sf_loss(lp, advantages, 5.0), log_prob), torch.tensor([-2.5, 2.5])
    )
    torch.testing.assert_close(
        grad_of(lambda lp: ddpo_is_loss(lp, log_prob, advantages, CLIP, 5.0), log_prob),
        torch.tensor([-2.5, 2.5]),
    )


@pytest.mark.math
def test_diagnostics():
    old = torch.zeros(4)
    new = torch.tensor([0.0, 2 * CLIP, -2 * CLIP, 0.5 * CLIP])
    stats = diagnostics(new, old, CLIP)
    assert stats["clipfrac"].item() == 0.5
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (new**2).mean().item())


@pytest.mark.math
def test_score_function_estimator_is_unbiased():
    """On a DDIM step whose noise prediction is the parameter and a quadratic reward
    r(x) = -||x - c||^2, E[r] = -||mean(eps) - c||^2 - const, so the true gradient is the gradient
    of -||mean - c||^2 through diffusers' own step. The REINFORCE estimate from our log-prob and
    loss must agree with it within 4 standard errors (estimated over 40 independent batches)."""
    torch.manual_seed(0)
    scheduler = sd14_scheduler(10)
    t = scheduler.timesteps[3]
    sample, target = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    eps = torch.randn(1, 2, 2, 2, requires_grad=True)

    mean = scheduler.step(
        eps, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    (true_grad,) = torch.autograd.grad(-((mean - target) ** 2).sum(), eps)

    estimates = []
    for _ in range(40):
        n = 5000
        expanded = eps.expand(n, -1, -1, -1)
        action, log_prob = step_with_logprob(
            scheduler, expanded, t, sample.expand(n, -1, -1, -1), reduce="sum"
        )
        reward = -((action - target) ** 2).sum(dim=(1, 2, 3))
        (grad,) = torch.autograd.grad(ddpo_sf_loss(log_prob, reward, float("inf")), eps)
        estimates.append(-grad)  # the loss is minus the surrogate
    estimates = torch.stack(estimates)
    standard_error = estimates.std(dim=0) / len(estimates) ** 0.5
    z = (estimates.mean(dim=0) - true_grad) / standard_error
    assert z.abs().max() < 4, z
    assert (
        4 * standard_error.max() < 0.1 * true_grad.norm()
    )  # sharp enough to see a bias of 10 % of the gradient


@pytest.mark.math
def test_stat_tracker_normalises_per_prompt_once_buffer_is_full():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    prompts = ["cat"] * 3 + ["dog"] * 3
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    advantages = tracker.update(prompts, rewards)
    expected = np.concatenate(
        [
            (rewards[:3] - 2) / (np.std(rewards[:3]) + 1e-6),
            (rewards[3:] - 20) / (np.std(rewards[3:]) + 1e-6),
        ]
    )
    np.testing.assert_allclose(advantages, expected)
    # the next batch is normalised by each prompt's buffer (old and new rewards together)
    advantages = tracker.update(["cat"], [4.0])
    np.testing.assert_allclose(advantages, [(4.0 - 2.5) / (np.std([1, 2, 3, 4]) + 1e-6)])


@pytest.mark.math
def test_stat_tracker_falls_back_to_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    prompts, rewards = ["cat", "cat", "dog", "dog"], np.array([1.0, 2.0, 5.0, 9.0])
    np.testing.assert_allclose(tracker.update(prompts, rewards), batch_advantages(rewards))
    np.testing.assert_allclose(batch_advantages(rewards), (rewards - 4.25) / (rewards.std() + 1e-6))


@pytest.mark.math
def test_stat_tracker_buffer_keeps_the_latest_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    for reward in range(10):
        tracker.update(["cat"], [float(reward)])
    assert list(tracker.buffers["cat"]) == [6.0, 7.0, 8.0, 9.0]


@pytest.mark.math
def test_policy_loss_is_each_algorithms_own_loss_and_refuses_one_without():
    g = torch.Generator().manual_seed(0)
    elements = torch.randn(4, 2, 3, 3, generator=g)
    log_prob = elements.mean(dim=(1, 2, 3))
    old, A = log_prob + 0.01 * torch.randn(4, generator=g), torch.randn(4, generator=g)
    A_map = torch.randn(4, 3, 3, generator=g)
    assert torch.equal(
        ddpo.policy_loss("ddpo-is", log_prob, elements, old, A, 1e-2, 5.0),
        ddpo.ddpo_is_loss(log_prob, old, A, 1e-2, 5.0),
    )
    assert torch.equal(
        ddpo.policy_loss("ddpo-sf", log_prob, elements, old, A, 1e-2, 5.0),
        ddpo.ddpo_sf_loss(log_prob, A, 5.0),
    )
    assert torch.equal(
        ddpo.policy_loss("pxpo", log_prob, elements, old, A_map, 1e-2, 5.0),
        ddpo.pxpo_loss(elements, A_map, 5.0),
    )
    for algo in ALGOS:  # every --algo but RWR's and NFT's, which regress instead, has its loss
        if algo.startswith("rwr") or algo == "nft":
            with pytest.raises(ValueError):
                ddpo.policy_loss(algo, log_prob, elements, old, A, 1e-2, 5.0)
        else:
            ddpo.policy_loss(algo, log_prob, elements, old, A_map if algo == "pxpo" else A, 1, 5)

"""The baselines and the extension (paper, section 4.2 and appendix D.2; PXPO, arXiv 2404.04356): RWR's weights,
sparse RWR's selection, and PXPO's per-position credit, which must reduce to DDPO when the
reward map is flat."""

from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import sd14_scheduler, tiny_pipeline

from machinery.cli import parse_args
from machinery.config import ALGOS, TUNED
from machinery.prompts import load_prompts
from ddpo import (
    PerPromptStatTracker,
    advantages,
    batch_advantages,
    ddpo_sf_loss,
    pool_to_latent,
    pxpo_loss,
    rwr_epoch_weights,
    rwr_loss,
    rwr_weights,
    sparse_rwr_weights,
    weight_share,
)
from sampler import step_with_logprob, sample_trajectories
import train
from train import rwr_regression_loss


@pytest.mark.math
def test_rwr_weights_are_exp_beta_r_averaging_one():
    rewards = np.array([-3.0, -1.0, 0.5, 2.0])
    weights = rwr_weights(rewards, beta=0.2)
    assert weights.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(weights / weights[0], np.exp(0.2 * (rewards - rewards[0])))


@pytest.mark.math
def test_rwr_weights_per_prompt_average_one_within_each_prompt_and_ignore_its_offset():
    prompts = ["cat", "dog", "cat", "dog", "dog"]
    rewards = np.array([1.0, 5.0, 2.0, 6.0, 9.0])
    weights = rwr_weights(rewards, prompts, beta=0.5)
    cat, dog = np.array([0, 2]), np.array([1, 3, 4])
    assert weights[cat].mean() == pytest.approx(1.0) and weights[dog].mean() == pytest.approx(1.0)
    shifted = rewards + np.array([0, 100, 0, 100, 100])  # one prompt is simply easier
    np.testing.assert_allclose(rwr_weights(shifted, prompts, beta=0.5), weights)
    assert not np.allclose(rwr_weights(rewards, beta=0.5), weights)  # over the batch they differ


@pytest.mark.math
def test_rwr_weights_do_not_overflow():
    assert np.isfinite(rwr_weights(np.array([1e4, 0.0]), beta=1.0)).all()


@pytest.mark.math
def test_weight_share_is_the_smallest_share_of_samples_carrying_90_percent_of_the_weight():
    assert weight_share(np.ones(10)) == pytest.approx(0.9)  # equal weights: 9 of 10
    assert weight_share(np.array([0.0, 0.0, 5.0, 0.0])) == pytest.approx(
        0.25
    )  # one sample holds it all
    assert weight_share(np.array([6.0, 3.0, 1.0])) == pytest.approx(2 / 3)  # 6 + 3 = 90 %


@pytest.mark.math
@pytest.mark.parametrize("beta_sigma, share", [(0.0, 0.9), (1.81, 0.3), (2.56, 0.1), (3.61, 0.01)])
def test_rwr_selectivity_on_normal_rewards_is_what_the_docstring_says(beta_sigma, share):
    sigma = 0.76  # jpeg's spread (kB) in the bundled model's first epoch
    rewards = np.random.default_rng(0).normal(-2.0, sigma, size=400_000)
    measured = weight_share(rwr_weights(rewards, beta=beta_sigma / sigma))
    assert measured == pytest.approx(1 - NormalDist().cdf(beta_sigma - 1.2816), rel=0.2)
    assert measured == pytest.approx(share, rel=0.2)


def rwr_loss_by_hand(pipe, traj, rows, weights, guidance_scale, seed):
    """The weighted denoising loss of the guided prediction eps_u + w (eps_c - eps_u), each branch
    its own UNet call, with the noise and timesteps rwr_regression_loss draws from the same seeds."""
    torch.manual_seed(seed)
    x0 = traj["latents"][rows, -1]
    noise = torch.randn_like(x0)
    t = torch.as_tensor(np.random.default_rng(seed).integers(1000, size=len(rows)))
    noisy = pipe.scheduler.add_noise(x0, noise, t)
    eps_c = pipe.unet(noisy, t, traj["prompt_embeds"][rows]).sample
    eps_u = pipe.unet(noisy, t, traj["negative_embeds"].expand(len(rows), -1, -1)).sample
    return rwr_loss(eps_u + guidance_scale * (eps_c - eps_u), noise, weights[rows]), rwr_loss(
        eps_c, noise, weights[rows]
    )


def test_rwr_regresses_the_guided_prediction_which_is_the_plain_one_at_guidance_1():
    pipe = tiny_pipeline()
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog", "an owl"],
        num_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    rows, weights = torch.tensor([0, 2]), torch.tensor([0.5, 1.0, 1.5])
    for guidance_scale in (1.0, 3.0):
        cfg = SimpleNamespace(algo="rwr", guidance_scale=guidance_scale)
        torch.manual_seed(7)
        loss = rwr_regression_loss(cfg, pipe, traj, weights, rows, np.random.default_rng(7))
        guided, plain = rwr_loss_by_hand(pipe, traj, rows, weights, guidance_scale, seed=7)
        torch.testing.assert_close(loss, guided)
        if guidance_scale == 1.0:
            torch.testing.assert_close(loss, plain)
        else:
            assert not torch.isclose(
                loss, plain
            )  # at w = 3 the conditional branch alone is another model


def test_rwr_on_a_v_prediction_model_regresses_the_velocity_its_own_training_loss():
    """At guidance 1 and weights 1 RWR's loss is the model's own training loss for its prediction
    type: on SD 2.x's v-prediction, || v - v_hat ||^2 with v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0
    (computed here in float64 from the schedule), not || noise - v_hat ||^2."""
    pipe = tiny_pipeline(family="sd2")
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog", "an owl"],
        num_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    rows, weights = torch.tensor([0, 1, 2]), torch.ones(3)
    torch.manual_seed(7)
    loss = rwr_regression_loss(
        SimpleNamespace(guidance_scale=1.0), pipe, traj, weights, rows, np.random.default_rng(7)
    )
    torch.manual_seed(7)
    x0 = traj["latents"][rows, -1]
    noise = torch.randn_like(x0)
    t = torch.as_tensor(np.random.default_rng(7).integers(1000, size=3))
    abar = pipe.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    velocity = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    prediction = pipe.unet(
        pipe.scheduler.add_noise(x0, noise, t), t, traj["prompt_embeds"]
    ).sample.double()
    torch.testing.assert_close(
        loss.double(), ((prediction - velocity) ** 2).mean(), rtol=1e-5, atol=1e-7
    )
    assert not torch.isclose(loss.double(), ((prediction - noise.double()) ** 2).mean(), rtol=1e-3)


def test_rwr_draws_only_the_sample_orders_it_uses():
    """Its microbatches are shuffled samples; no step orders are drawn for it (DDPO's update draws them)."""
    cfg = SimpleNamespace(inner_epochs=3, batch_size=2)
    rng, expected = np.random.default_rng(5), np.random.default_rng(5)
    batches = train.shuffled_microbatches(cfg, 6, rng, "cpu")
    orders = [expected.permutation(6) for _ in range(3)]
    assert [rows.tolist() for rows, steps in batches] == [
        order[k : k + 2].tolist() for order in orders for k in (0, 2, 4)
    ]
    assert all(steps is None for _, steps in batches)
    assert rng.bit_generator.state == expected.bit_generator.state  # nothing else drawn


def test_rwr_runs_as_the_original_five_passes_with_weights_over_the_round_and_flags_win():
    cfg = parse_args(["--algo", "rwr", "--prompts", "shapes", "--out", "/nonexistent/rwr"])
    assert (cfg.inner_epochs, cfg.per_prompt_stat_tracking, cfg.updates_per_epoch) == (5, False, 4)
    assert parse_args(["--algo", "rwr-sparse", "--out", "/nonexistent/s"]).inner_epochs == 5
    assert parse_args(["--algo", "ddpo-is", "--out", "/nonexistent/is"]).inner_epochs == 1
    assert (
        parse_args(
            [
                "--algo",
                "rwr",
                "--inner-epochs",
                "2",
                "--per-prompt-stat-tracking",
                "--out",
                "/nonexistent/r",
            ]
        ).inner_epochs
        == 2
    )


@pytest.mark.parametrize(
    "algo, flags", [("ddpo-sf", ["--updates-per-epoch", "4"]), ("pxpo", ["--inner-epochs", "2"])]
)
def test_the_on_policy_estimators_refuse_a_second_update_on_the_same_samples(algo, flags, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--algo", algo, *flags, "--out", "/nonexistent/run"])
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2
        and "on-policy" in err
        and "use --algo ddpo-is" in err
        and len(err.strip().splitlines()) == 1
    )


def test_the_tiny_preset_runs_each_algorithm_at_its_tuned_setting_and_flags_win():
    assert {algo for _, algo in TUNED["tiny"]} == set(
        ALGOS
    )  # every algorithm has a tuned setting on the bundled model
    for (reward, algo), settings in TUNED["tiny"].items():
        cfg = parse_args(
            ["--algo", algo, "--reward", reward, "--prompts", "shapes", "--out", "/nonexistent/run"]
        )
        assert cfg.preset == "tiny" and {key: getattr(cfg, key) for key in settings} == settings
    given = parse_args(
        ["--algo", "rwr", "--lr", "1e-3", "--beta", "2", "--out", "/nonexistent/run"]
    )
    assert (given.lr, given.beta) == (1e-3, 2.0)
    demo = parse_args(["--reward", "jpeg", "--out", "/nonexistent/run"])
    assert (demo.algo, demo.lr) == ("ddpo-is", 5e-3)  # the CPU demo's own setting
    paper = parse_args(
        [
            "--algo",
            "rwr",
            "--model",
            "CompVis/stable-diffusion-v1-4",
            "--device",
            "cpu",
            "--out",
            "/nonexistent/run",
        ]
    )
    assert (paper.preset, paper.lr, paper.beta) == (
        "paper",
        3e-4,
        0.2,
    )  # SD v1.4 keeps the paper's settings


@pytest.mark.math
def test_sparse_rwr_keeps_the_top_tenth_of_each_prompt_with_ten_samples_and_of_the_rest_together():
    rng = np.random.default_rng(0)
    small = [
        f"animal {k}" for k in range(10) for _ in range(2)
    ]  # 10 prompts of 2 samples each: 20 samples ranked together
    prompts = ["cat"] * 30 + ["dog"] * 20 + small
    rewards = rng.normal(size=len(prompts))
    weights = sparse_rwr_weights(rewards, prompts)
    assert set(weights) == {0.0, 1.0}
    for pool, kept in ((["cat"], 3), (["dog"], 2), (sorted(set(small)), 2)):  # 10 % of each pool
        rows = np.array([p in pool for p in prompts])
        assert weights[rows].sum() == kept
        assert rewards[rows][weights[rows] == 1].min() > rewards[rows][weights[rows] == 0].max()
    assert sparse_rwr_weights(rewards).sum() == 7  # over the batch: 10 % of 70
    assert sparse_rwr_weights(rewards[:4], prompts[:4]).sum() == 1  # at least one


@pytest.mark.parametrize(
    "prompt_set, samples",
    [("imagenet_animals", 256), ("simple_animals", 256), ("shapes", 64)],
    ids=["sd14-defaults", "simple-animals", "tiny-preset"],
)
@pytest.mark.math
def test_sparse_rwr_keeps_ten_percent_of_an_epoch_on_any_prompt_set(prompt_set, samples):
    """Prompts drawn as train.py draws them (uniformly, with repeats), so most prompts get one to
    five samples an epoch; the kept share is 10 % +- 2 points on every one of 20 draws."""
    prompts = load_prompts(prompt_set)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        drawn = [prompts[i] for i in rng.integers(len(prompts), size=samples)]
        weights = rwr_epoch_weights(
            "rwr-sparse", drawn, torch.as_tensor(rng.normal(size=samples)), per_prompt=True
        )
        assert 0.08 <= (weights > 0).mean() <= 0.12, seed


@pytest.mark.math
def test_rwr_loss_is_the_weighted_denoising_loss():
    eps_pred, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    weights = torch.tensor([0.0, 1.0, 2.0])
    per_sample = ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(rwr_loss(eps_pred, noise, weights), (weights * per_sample).mean())
    torch.testing.assert_close(
        rwr_loss(eps_pred, noise, torch.ones(3)), ((eps_pred - noise) ** 2).mean()
    )


@pytest.mark.math
def test_pool_to_latent_averages_each_cells_pixel_patch():
    reward_map = torch.rand(2, 16, 16)
    pooled = pool_to_latent(reward_map, (2, 2))
    assert pooled.shape == (2, 2, 2)
    torch.testing.assert_close(pooled[1, 0, 1], reward_map[1, :8, 8:].mean())
    torch.testing.assert_close(
        pool_to_latent(torch.full((1, 64, 64), 0.3), (8, 8)), torch.full((1, 8, 8), 0.3)
    )


def per_element_log_prob(eps):
    """log p(x_{t-1} | x_t) of every latent element, (B, C, h, w), as a function of the prediction."""
    scheduler = sd14_scheduler(10)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 4, 4, 4, generator=generator)
    prev = torch.randn(3, 4, 4, 4, generator=generator)
    return step_with_logprob(
        scheduler, eps, scheduler.timesteps[3], sample, prev_sample=prev, reduce="none"
    )[1]


@pytest.mark.math
def test_pxpo_with_a_constant_map_is_ddpo_sf():
    advantages = torch.tensor([1.5, -0.5, 0.2])
    eps = torch.randn(3, 4, 4, 4).requires_grad_(True)
    pxpo = pxpo_loss(per_element_log_prob(eps), advantages[:, None, None].expand(3, 4, 4), 5.0)
    (pxpo_grad,) = torch.autograd.grad(pxpo, eps)
    sf = ddpo_sf_loss(per_element_log_prob(eps).mean(dim=(1, 2, 3)), advantages, 5.0)
    (sf_grad,) = torch.autograd.grad(sf, eps)
    torch.testing.assert_close(pxpo, sf)
    torch.testing.assert_close(pxpo_grad, sf_grad)
    assert sf_grad.abs().max() > 0


@pytest.mark.math
def test_pxpo_credits_each_latent_position_with_its_own_advantage():
    advantages = torch.zeros(3, 4, 4)
    advantages[0, 1, 2] = 2.0
    eps = torch.randn(3, 4, 4, 4).requires_grad_(True)
    (grad,) = torch.autograd.grad(pxpo_loss(per_element_log_prob(eps), advantages, 5.0), eps)
    assert (grad[0, :, 1, 2].abs() > 0).all()  # every channel at the credited position
    grad[0, :, 1, 2] = 0
    assert grad.abs().max() == 0  # and nothing elsewhere


@pytest.mark.math
def test_each_position_of_a_reward_map_is_normalised_by_its_prompts_scalar_statistics():
    prompts, rewards = ["cat", "cat", "dog", "dog"], np.array([1.0, 2.0, 5.0, 9.0])
    flat = np.broadcast_to(rewards[:, None, None], (4, 2, 2))
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    expected = PerPromptStatTracker(buffer_size=8, min_count=2).update(prompts, rewards)
    np.testing.assert_allclose(
        tracker.update(prompts, rewards, flat), np.broadcast_to(expected[:, None, None], (4, 2, 2))
    )
    bumped = flat.copy()
    bumped[0, 0, 0] += 1.0
    advantages = batch_advantages(rewards, bumped)
    assert advantages[0, 0, 0] == pytest.approx(
        batch_advantages(rewards)[0] + 1 / (rewards.std() + 1e-6)
    )


@pytest.mark.math
def test_per_position_statistics_give_a_position_that_is_high_in_every_sample_no_advantage():
    """A 'shape' position scores 0.9 in every sample of its prompt, the 'background' varies: with
    the prompt's scalar statistics the shape's position wins for being the shape; with per-position
    statistics it gets zero, and the background's positions are ranked among themselves."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 0.5, size=(6, 2, 2))
    maps[:, 0, 0] = 0.9  # the shape
    prompts, rewards = ["cat"] * 6, maps.mean(axis=(1, 2))
    scalar_stats = PerPromptStatTracker(buffer_size=8, min_count=2).update(prompts, rewards, maps)
    assert (scalar_stats[:, 0, 0] > 1).all()
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2, per_position=True)
    per_position = tracker.update(prompts, rewards, maps)
    np.testing.assert_allclose(per_position[:, 0, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(
        per_position[:, 1, 1], (maps[:, 1, 1] - maps[:, 1, 1].mean()) / (maps[:, 1, 1].std() + 1e-6)
    )
    np.testing.assert_allclose(batch_advantages(rewards, maps, per_position=True), per_position)
    restored = PerPromptStatTracker(buffer_size=8, min_count=2, per_position=True)
    restored.load_state_dict(tracker.state_dict())  # a checkpoint's round trip
    np.testing.assert_allclose(
        restored.update(prompts, rewards, maps), tracker.update(prompts, rewards, maps)
    )


@pytest.mark.math
def test_pxpo_advantages_of_a_scalar_reward_are_ddpos_at_every_position():
    prompts, rewards = ["cat", "dog", "cat", "dog"], torch.tensor([1.0, 3.0, 2.0, 7.0])
    ddpo_advantages = advantages("ddpo-is", prompts, rewards, (8, 8))
    pxpo_advantages = advantages("pxpo", prompts, rewards, (8, 8))
    assert pxpo_advantages.shape == (4, 8, 8)
    torch.testing.assert_close(pxpo_advantages, ddpo_advantages[:, None, None].expand(4, 8, 8))
    weights = rwr_epoch_weights("rwr-sparse", prompts, rewards, per_prompt=True)
    np.testing.assert_allclose(
        weights, [0.0, 0.0, 0.0, 4.0]
    )  # two samples a prompt: ranked together, the best kept, mean 1

"""The KL leash to the base model and the fixed-noise evaluation (overoptimisation, issue 16)."""

import json
import types

import pytest
import torch
from conftest import perturb_lora, sd14_scheduler

import toy_world
import train
from machinery.evaluation import evaluate
from machinery.prompts import load_prompts
from machinery.pipeline import add_trainable, load_pipeline
import rewards
from machinery.leash import KLToBase, base_policy, policy_kl
from sampler import ddim_mean_std, guided_prediction, sample_trajectories

SMALL = ["--samples-per-epoch", "8", "--batch-size", "2", "--num-steps", "3", "--lr", "1e-2"]


def states(pipe):
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog", "an owl"],
        num_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    return (
        traj["latents"][:, 1],
        traj["timesteps"][:, 1],
        traj["prompt_embeds"],
        traj["negative_embeds"],
        3.0,
    )


def step_kl(pipe, eps, base_eps, state):
    return policy_kl(pipe.scheduler, eps, base_eps, state[1], state[0], 1.0)


def two_gaussians():
    """A DDIM step's state and two predictions of it: the policy's (with gradient) and the base's."""
    scheduler = sd14_scheduler(10)
    t, sample = scheduler.timesteps[3], torch.randn(3, 4, 8, 8)
    eps, base_eps = (
        torch.randn(3, 4, 8, 8, requires_grad=True),
        torch.randn(3, 4, 8, 8, requires_grad=True),
    )
    return scheduler, t, sample, eps, base_eps


@pytest.mark.math
def test_policy_kl_equals_torch_distributions_kl_of_the_two_gaussians():
    scheduler, t, sample, eps, base_eps = two_gaussians()
    (mean, std), (base_mean, _) = (
        ddim_mean_std(scheduler, eps, t, sample),
        ddim_mean_std(scheduler, base_eps, t, sample),
    )
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)),
        torch.distributions.Normal(base_mean, std.expand_as(mean)),
    )
    kl = {
        reduce: policy_kl(scheduler, eps, base_eps, t, sample, reduce=reduce)
        for reduce in ("none", "sum", "mean")
    }
    torch.testing.assert_close(kl["none"], expected)
    torch.testing.assert_close(kl["sum"], expected.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(
        kl["mean"], expected.mean(dim=(1, 2, 3))
    )  # the default: per element, as the log-prob


@pytest.mark.math
def test_policy_kl_gradient_flows_only_through_the_current_policy():
    scheduler, t, sample, eps, base_eps = two_gaussians()
    policy_kl(scheduler, eps, base_eps, t, sample, reduce="sum").sum().backward()
    assert base_eps.grad is None
    (mean, std), (base_mean, _) = (
        ddim_mean_std(scheduler, eps, t, sample),
        ddim_mean_std(scheduler, base_eps, t, sample),
    )
    # d KL / d eps = (mean - base_mean) / sigma^2 * d mean / d eps, the step's coefficient of eps (epsilon prediction)
    abar, abar_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 100]
    coefficient = (
        -abar_prev.sqrt() * (1 - abar).sqrt() / abar.sqrt() + (1 - abar_prev - std**2).sqrt()
    )
    torch.testing.assert_close(eps.grad, ((mean - base_mean) / std**2 * coefficient).detach())


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_kl_to_base_is_zero_at_initialisation_and_the_base_stays_the_pretrained_policy(
    lora_rank, tiny_pipeline_dir
):
    pipe, pretrained = load_pipeline(tiny_pipeline_dir), load_pipeline(tiny_pipeline_dir)
    params = add_trainable(pipe, lora_rank)
    base = base_policy(pipe.unet, lora_rank)
    state = states(pretrained)
    pipe.scheduler = pretrained.scheduler  # set to the sampled timesteps
    with torch.no_grad(), base() as unet:
        base_eps = guided_prediction(unet, *state)
    assert (
        step_kl(pipe, guided_prediction(pipe.unet, *state), base_eps, state).abs().max() == 0
    )  # a fresh LoRA (B = 0) is the identity
    perturb_lora(pipe.unet) if lora_rank else torch.nn.init.normal_(
        pipe.unet.conv_out.weight, 0, 0.1
    )
    moved = guided_prediction(pipe.unet, *state)
    with torch.no_grad(), base() as unet:
        still_base = guided_prediction(unet, *state)
    expected = guided_prediction(pretrained.unet, *state)
    torch.testing.assert_close(
        still_base, expected, rtol=0, atol=0
    )  # the base ignores the trained weights
    assert step_kl(pipe, moved, still_base, state).min() > 0
    assert all(
        p.requires_grad for p in params
    )  # switching the adapter off and on again leaves it trainable
    torch.testing.assert_close(guided_prediction(pipe.unet, *state), moved, rtol=0, atol=0)


def test_sampling_with_the_kl_measure_reports_the_kl_of_every_visited_state(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    add_trainable(pipe, 4)
    perturb_lora(pipe.unet)
    base = base_policy(pipe.unet, 4)
    measure = KLToBase(pipe, base, 1.0, pipe.family.POLICY)
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog"],
        num_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        on_step=measure,
    )
    plain = sample_trajectories(
        pipe,
        ["a cat", "a dog"],
        num_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(
        traj["latents"], plain["latents"], rtol=0, atol=0
    )  # measuring draws no noise
    assert measure.kl().shape == (2, 4)
    j = 2
    state = (
        traj["latents"][:, j],
        traj["timesteps"][:, j],
        traj["prompt_embeds"],
        traj["negative_embeds"],
        3.0,
    )
    with torch.no_grad(), base() as unet:
        base_eps = guided_prediction(unet, *state)
    torch.testing.assert_close(
        measure.kl()[:, j],
        step_kl(pipe, guided_prediction(pipe.unet, *state), base_eps, state),
        rtol=1e-5,
        atol=1e-7,
    )


def test_the_leash_holds_the_policy_nearer_the_base(tiny_pipeline_dir, tmp_path):
    """Same seed, same samples in the first epoch: only the penalty differs, and the policy drifts less."""
    common = [
        "--model",
        str(tiny_pipeline_dir),
        "--epochs",
        "2",
        "--prompts",
        "simple_animals",
        *SMALL,
    ]
    free = train.main([*common, "--out", str(tmp_path / "free")])
    leashed = train.main([*common, "--out", str(tmp_path / "leashed"), "--kl-coef", "30"])
    assert free[0]["reward_mean"] == leashed[0]["reward_mean"]
    assert 0 < leashed[-1]["kl_to_base"] < free[-1]["kl_to_base"]


def test_heldout_prompts_are_never_trained_on_yet_every_colour_and_shape_is():
    train_set, heldout = load_prompts("shapes_train"), load_prompts("shapes_heldout")
    assert not set(train_set) & set(heldout) and sorted(train_set + heldout) == sorted(
        toy_world.PROMPTS
    )
    assert {toy_world.parse(p)[0] for p in train_set} == set(toy_world.COLOURS) and {
        toy_world.parse(p)[1] for p in train_set
    } == set(toy_world.SHAPES)
    assert len({toy_world.parse(p)[0] for p in heldout}) == len(heldout)  # one shape per colour


def test_the_evaluation_uses_the_same_noise_every_time_and_leaves_training_alone(
    tiny_pipeline_dir, tmp_path
):
    common = [
        "--model",
        str(tiny_pipeline_dir),
        "--epochs",
        "3",
        "--prompts",
        "shapes_train",
        *SMALL,
    ]
    plain = train.main([*common, "--out", str(tmp_path / "plain")])
    out = tmp_path / "evaluated"
    evaluated = train.main(
        [
            *common,
            "--out",
            str(out),
            "--eval-every",
            "2",
            "--eval-prompts",
            "shapes",
            "--eval-samples",
            "15",
        ]
    )

    def training(history):
        return [
            {k: v for k, v in m.items() if not k.startswith("eval") and not k.endswith("seconds")}
            for m in history
        ]

    assert training(evaluated[:3]) == training(
        plain
    )  # the training's random streams never see the evaluation
    # before epochs 0 and 2, and the final weights after epoch 2's update, in a row of their own
    assert [m.get("eval_after_epochs") for m in evaluated] == [
        0,
        None,
        2,
        3,
    ] and "reward_mean" not in evaluated[3]
    assert evaluated[0]["eval_kl_to_base"] == 0 and evaluated[2]["eval_kl_to_base"] > 0
    for group in ("trained", "heldout"):  # 10 trained and 5 held-out prompts
        assert (
            0 <= evaluated[0][f"eval_{group}_fidelity"] <= 1
            and f"eval_{group}_reward_mean" in evaluated[3]
        )
    assert all((out / "samples" / f"eval_epoch_{epoch:04d}.png").is_file() for epoch in (0, 2, 3))
    assert [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == evaluated
    pipe = load_pipeline(tiny_pipeline_dir)
    add_trainable(pipe, 4)
    cfg = types.SimpleNamespace(**json.loads((out / "config.json").read_text()))
    args = (
        pipe,
        base_policy(pipe.unet, 4),
        toy_world.PROMPTS,
        set(toy_world.TRAIN),
        rewards.jpeg_compressibility,
        torch.autocast("cpu", enabled=False),
        out,
        9,
    )
    first, again = evaluate(cfg, *args), evaluate(cfg, *args)
    assert {k: v for k, v in first.items() if k != "eval_seconds"} == {
        k: v for k, v in again.items() if k != "eval_seconds"
    }
    assert (
        first["eval_reward_mean"] == evaluated[0]["eval_reward_mean"]
    )  # the base policy at epoch 0, from the same noise
    pipe.unet.load_state_dict(
        torch.load(out / "checkpoints" / "epoch_0002.pt", weights_only=True)["trainable"],
        strict=False,
    )
    final = evaluate(
        cfg, *args
    )  # the weights the run ended with, as its last checkpoint (and lora/) holds them
    assert (
        final["eval_reward_mean"]
        == evaluated[3]["eval_reward_mean"]
        != evaluated[2]["eval_reward_mean"]
    )

"""DiffusionNFT (--algo nft, machinery/nft.py): its loss against a float64 formula; at the sampling
policy's weights its gradient is the advantage-weighted regression on the samples (zero at A = 0);
every model's prediction gives back the clean sample it was made from; the sampling policy's
decay schedule, swap and EMA; it trains, evaluates and resumes exactly on the bundled DDIM model
(the SD3- and FLUX-shaped pipelines: test_flow's OPTIONS), and an epoch trains on SD 2.x's
v-prediction and on SDXL."""

import json

import pytest
import torch
from diffusers import DDIMScheduler

import train
from machinery import nft
from machinery.config import BUNDLED_MODEL
from machinery.families.sd3 import FlowSDEScheduler


def draws(seed, *shapes):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]


@pytest.mark.math
def test_the_loss_is_the_papers_positive_and_negative_flow_matching_on_the_samples():
    x0_theta, x0_old, x0 = draws(0, (3, 2, 4, 4), (3, 2, 4, 4), (3, 2, 4, 4))
    r, beta, adv_clip_max = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 0.3, 5.0
    positive = beta * x0_theta + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_theta
    expected = 0.0
    for i in range(3):
        err_p, err_n = positive[i] - x0[i], negative[i] - x0[i]
        term_p = (err_p**2).mean() / err_p.abs().mean()
        term_n = (err_n**2).mean() / err_n.abs().mean()
        expected += adv_clip_max * (r[i] * term_p + (1 - r[i]) * term_n) / beta / 3
    loss = nft.nft_loss(x0_theta, x0_old, x0, r, beta, adv_clip_max)
    torch.testing.assert_close(loss, expected)


@pytest.mark.math
def test_at_the_sampling_policy_the_gradient_is_the_advantage_weighted_regressions():
    """The bridge to AWM and RWR: at x0_theta = x0_old, grad L = grad mean(clip(A) ||x0_theta -
    x_0||^2 / w), w each sample's mean |x0_theta - x_0| held fixed; at A = 0 (r = 1/2) it is 0."""
    (start, x0), A = draws(1, (4, 2, 3, 3), (4, 2, 3, 3)), torch.tensor([-7.0, -1.0, 0.5, 2.0])
    A = A.double()
    x0_theta = start.clone().requires_grad_(True)
    r = nft.optimality(A, 5.0)
    nft.nft_loss(x0_theta, start, x0, r, 0.7, 5.0).backward()
    w = (start - x0).abs().mean(dim=(1, 2, 3))
    regression = A.clamp(-5, 5) * ((x0_theta - x0) ** 2).mean(dim=(1, 2, 3)) / w
    expected = torch.autograd.grad(regression.mean(), x0_theta)[0]
    torch.testing.assert_close(x0_theta.grad, expected)
    neutral = nft.nft_loss(x0_theta, start, x0, nft.optimality(torch.zeros(4), 5.0), 0.7, 5.0)
    assert torch.autograd.grad(neutral, x0_theta)[0].abs().max() < 1e-12


@pytest.mark.math
def test_the_optimality_maps_the_clipped_advantage_linearly_onto_0_to_1():
    A = torch.tensor([-9.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    torch.testing.assert_close(nft.optimality(A, 5.0), expected)


@pytest.mark.math
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_each_models_prediction_of_its_own_target_gives_back_the_clean_sample(kind):
    if kind == "flow":
        scheduler = FlowSDEScheduler(shift=3.0)
        scheduler.register_to_config(prediction_type="v_prediction")  # as load_pipeline does
        scheduler.set_timesteps(10)
    else:
        scheduler = DDIMScheduler(prediction_type=kind)
        scheduler.set_timesteps(10)
    x0, noise = (x.float() for x in draws(2, (3, 4, 8, 8), (3, 4, 8, 8)))
    t = scheduler.timesteps[[0, 4, 9]]
    x_t, target = train.denoising(scheduler, x0, noise, t)
    torch.testing.assert_close(nft.clean_prediction(scheduler, x_t, t, target), x0)


@pytest.mark.math
def test_the_decay_schedules_are_the_codes_return_decay():
    assert [nft.decay(s, 0) for s in (0, 500)] == [0.0, 0.0]
    assert [nft.decay(s, 1) for s in (0, 100, 499, 10_000)] == pytest.approx([0, 0.1, 0.499, 0.5])
    assert [nft.decay(s, 2) for s in (0, 74, 175, 10_000)] == pytest.approx([0, 0, 0.75, 0.999])


def test_the_sampling_policy_swaps_in_its_weights_and_follows_the_trained_ones_by_its_ema():
    weight = torch.nn.Parameter(torch.ones(3))
    old = nft.OldPolicy([weight], decay_type=1)
    with torch.no_grad():
        weight.fill_(3.0)  # the trained weights move
    with old.weights():
        assert torch.equal(weight.detach(), torch.ones(3))  # the sampling policy's
    assert torch.equal(weight.detach(), torch.full((3,), 3.0))  # and back
    old.follow(100)  # decay 0.1: 0.1 * 1 + 0.9 * 3
    torch.testing.assert_close(old.old[0], torch.full((3,), 2.8))
    fresh = nft.OldPolicy([weight], decay_type=1)
    fresh.load_state_dict(old.state_dict())
    assert fresh.steps == 100 and torch.equal(fresh.old[0], old.old[0])


def test_under_mixed_precision_the_trained_forward_sees_the_trained_weights_not_the_old():
    """Autocast caches a weight's bf16 copy by tensor: the swap in and out must not leave the old
    weights' copy for the trained forward of the same autocast block."""
    layer = torch.nn.Linear(4, 4)
    old = nft.OldPolicy(list(layer.parameters()), decay_type=1)
    with torch.no_grad():
        layer.weight.add_(1.0)  # the trained weights move away from the sampling policy's
    x = torch.ones(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad(), old.weights():
            y_old = layer(x)
        y_theta = layer(x)
    torch.testing.assert_close(y_theta.float(), layer(x), atol=0.1, rtol=0.02)
    assert (y_theta.float() - y_old.float()).abs().min() > 3  # 4 inputs of 1, each weight +1


def metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in lines]


def test_nft_trains_and_evaluates_without_guidance_and_resumes_exactly_on_the_ddim_model(tmp_path):
    flags = lambda out, epochs: [  # noqa: E731
        *("--model", str(BUNDLED_MODEL), "--algo", "nft", "--out", str(out)),
        *("--epochs", str(epochs), "--samples-per-epoch", "8", "--batch-size", "2"),
        *("--sample-batch-size", "8", "--num-steps", "4", "--prompts", "shapes", "--lr", "1e-2"),
        *("--eval-every", "1", "--eval-samples", "4"),
    ]
    train.main(flags(tmp_path / "straight", 2))
    train.main(flags(tmp_path / "resumed", 1))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["guidance_scale"] == 1.0 and config["beta"] == 1.0
    trained = [m for m in straight if "loss" in m]
    assert all(m["loss"] > 0 for m in trained) and trained[1]["old_deviation"] > 0
    # evaluated with its own sampler, the ODE, whose steps have no KL to the base to measure
    evaluated = [m for m in straight if "eval_reward_mean" in m]
    assert len(evaluated) == 3 and not any("eval_kl_to_base" in m for m in evaluated)
    assert metrics(tmp_path / "resumed") == straight


@pytest.mark.parametrize("family", ["tiny_sd2_pipeline_dir", "tiny_sdxl_pipeline_dir"])
def test_an_epoch_of_nft_trains_on_a_v_prediction_model_and_on_sdxl(family, request, tmp_path):
    out = tmp_path / "run"
    train.main(
        [
            *("--model", str(request.getfixturevalue(family)), "--algo", "nft"),
            *("--out", str(out), "--epochs", "1", "--samples-per-epoch", "8"),
            *("--batch-size", "2", "--num-steps", "3", "--prompts", "simple_animals"),
        ]
    )
    (trained,) = metrics(out)
    assert trained["loss"] > 0 and trained["skipped_updates"] == 0

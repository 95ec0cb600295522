"""AWM (--algo awm, machinery/matching.py): its log-prob is minus the pretraining loss on the clean
sample, its loss DDPO_IS's clipped ratio of it. Checked against float64 formulas; with the weights
unchanged every ratio is exactly 1 (the old log-prob's t and noise are the trained ones); one
epoch trains and resumes exactly on both bundled models and a tiny SD3-shaped pipeline."""

import json

import numpy as np
import pytest
import torch

import ddpo
import train
from machinery import matching
from machinery.cli import parse_args
from machinery.config import BUNDLED_FLOW_MODEL, BUNDLED_MODEL
from machinery.pipeline import add_trainable, load_pipeline
from sampler import sample_trajectories


@pytest.mark.math
def test_the_log_prob_is_minus_the_mean_squared_error_over_each_samples_elements():
    generator = torch.Generator().manual_seed(0)
    prediction, target = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(2))
    reference = -((prediction.double() - target.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(matching.matching_log_prob(prediction, target).double(), reference)


@pytest.mark.math
def test_at_ratio_1_the_gradient_is_the_advantage_weighted_pretraining_losss():
    """AWM's bridge: at the old weights the clipped ratio's gradient is that of mean(A * mse), the
    pretraining loss weighted by the advantage; at A = 0 it is zero."""
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(4, 2, 3, 3, generator=generator, requires_grad=True)
    target, advantages = torch.randn(4, 2, 3, 3, generator=generator), torch.randn(4)
    log_prob = matching.matching_log_prob(prediction, target)
    ddpo.ddpo_is_loss(log_prob, log_prob.detach(), advantages, 1e-4, 5.0).backward()
    expected = torch.autograd.grad(
        (advantages * ((prediction - target) ** 2).flatten(1).mean(1)).mean(), prediction
    )[0]
    torch.testing.assert_close(prediction.grad, expected)
    log_prob = matching.matching_log_prob(prediction, target)
    zero = ddpo.ddpo_is_loss(log_prob, log_prob.detach(), torch.zeros(4), 1e-4, 5.0)
    assert torch.autograd.grad(zero, prediction)[0].abs().max() == 0


def test_with_the_weights_unchanged_every_ratio_is_exactly_1(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    params = add_trainable(pipe, lora_rank=4)
    for p in params:
        p.data.normal_(0, 0.05)
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog"] * 2,
        num_steps=4,
        guidance_scale=5.0,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
    )
    flags = ["--model", str(tiny_pipeline_dir), "--algo", "awm", "--num-steps", "4"]
    cfg = parse_args([*flags, "--samples-per-epoch", "4", "--batch-size", "1"])
    optimizer = torch.optim.SGD(params, lr=0.0)  # the weights never move
    learner = train.Learner(pipe, params, optimizer, np.random.default_rng(0))
    stats = matching.awm_update(cfg, learner, traj, torch.randn(4))
    assert stats["approx_kl"] == 0 and stats["clipfrac"] == 0 and np.isfinite(stats["loss"])


def metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in lines]


@pytest.mark.parametrize("model", ["ddim", "flow"])  # SD3's and FLUX's shapes: test_flow's OPTIONS
def test_awm_trains_and_resumes_exactly_on_both_bundled_models(model, tmp_path):
    path = {"ddim": BUNDLED_MODEL, "flow": BUNDLED_FLOW_MODEL}[model]
    flags = lambda out, epochs: [  # noqa: E731
        *("--model", str(path), "--algo", "awm", "--out", str(out), "--epochs", str(epochs)),
        *("--samples-per-epoch", "8", "--batch-size", "2", "--sample-batch-size", "8"),
        *("--num-steps", "4", "--prompts", "shapes", "--lr", "1e-2"),
    ]
    train.main(flags(tmp_path / "straight", 2))
    train.main(flags(tmp_path / "resumed", 1))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    assert (
        all(np.isfinite(m["loss"]) for m in straight) and max(m["clipfrac"] for m in straight) > 0
    )
    assert metrics(tmp_path / "resumed") == straight

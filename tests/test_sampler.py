"""The policy's log-prob (paper, section 4.3), checked against diffusers and torch.distributions."""
import math

import pytest
import torch
from conftest import perturb_lora, sd14_scheduler

from pipeline import add_trainable, load_pipeline
from sampler import ddim_step_with_logprob, policy_log_prob, sample_trajectories

NUM_STEPS = 10
SHAPE = (3, 4, 8, 8)


def diffusers_mean_and_std(scheduler, eps, t, sample, eta):
    """diffusers' own DDIM step: with zero noise it returns the mean; with unit noise mean + sigma."""
    mean = scheduler.step(eps, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    std = scheduler.step(eps, t, sample, eta=eta, variance_noise=torch.ones_like(sample)).prev_sample - mean
    return mean, std


@pytest.mark.math
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("step", [0, NUM_STEPS // 2, NUM_STEPS - 1])  # first, middle, last (t' < 0)
@pytest.mark.parametrize("options", [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                                     {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}],
                         ids=["sd1-epsilon", "sd2-v", "v-trailing", "v-trailing-zero-snr"])
def test_ddim_step_equals_diffusers_step_for_same_noise(eta, step, options):
    scheduler = sd14_scheduler(NUM_STEPS, **options)
    t = scheduler.timesteps[step]
    sample, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    ours, _ = ddim_step_with_logprob(scheduler, eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # and the mean alone: at x_{t-1} = diffusers' mean each element has the Gaussian's peak density
    mean, std = diffusers_mean_and_std(scheduler, eps, t, sample, eta)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, sample, eta=eta, prev_sample=mean, reduce="none")
    torch.testing.assert_close(log_prob, -torch.log(std) - 0.5 * math.log(2 * math.pi), rtol=1e-5, atol=1e-5)


@pytest.mark.math
def test_a_prediction_type_without_its_maths_is_refused_in_one_line():
    for options, named in (({"prediction_type": "sample"}, "'sample'"), ({"thresholding": True}, "thresholding")):
        with pytest.raises(ValueError, match=f"{named}.*only epsilon and v_prediction"):
            ddim_step_with_logprob(sd14_scheduler(NUM_STEPS, **options), torch.randn(SHAPE), 981, torch.randn(SHAPE))


@pytest.mark.math
@pytest.mark.parametrize("step", [0, NUM_STEPS - 1])
def test_log_prob_reductions_match_normal_density(step):
    torch.manual_seed(step)
    scheduler = sd14_scheduler(NUM_STEPS)
    t = scheduler.timesteps[step]
    sample, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    mean, std = diffusers_mean_and_std(scheduler, eps, t, sample, eta=1.0)
    prev = mean + std * torch.randn(SHAPE)  # an action the policy could take
    expected = torch.distributions.Normal(mean, std).log_prob(prev)
    log_prob = {r: ddim_step_with_logprob(scheduler, eps, t, sample, prev_sample=prev, reduce=r)[1] for r in ("sum", "mean", "none")}
    assert log_prob["none"].shape == SHAPE
    torch.testing.assert_close(log_prob["none"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob["sum"], expected.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(log_prob["mean"], log_prob["sum"] / (4 * 8 * 8), rtol=1e-6, atol=1e-6)


@pytest.mark.math
def test_per_sample_timesteps_equal_scalar_steps():
    scheduler = sd14_scheduler(NUM_STEPS)
    sample, eps, prev = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    steps = scheduler.timesteps[[0, 4, 9]]
    _, batched = ddim_step_with_logprob(scheduler, eps, steps, sample, prev_sample=prev)
    one_by_one = [ddim_step_with_logprob(scheduler, eps[i : i + 1], steps[i], sample[i : i + 1], prev_sample=prev[i : i + 1])[1] for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(one_by_one))


@pytest.mark.math
def test_eta_zero_has_no_density():
    scheduler = sd14_scheduler(NUM_STEPS)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, torch.randn(SHAPE), scheduler.timesteps[0], torch.randn(SHAPE), eta=0.0)


@pytest.mark.math
def test_recomputed_log_prob_equals_sampling_log_prob_with_cfg_and_lora(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    add_trainable(pipe.unet, lora_rank=4)
    perturb_lora(pipe.unet)
    prompts = ["a cat", "a dog", "a red fox", "an owl", "a cat"]
    traj = sample_trajectories(pipe, prompts, num_steps=6, guidance_scale=5.0, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert traj["latents"].shape == (5, 7, 4, 8, 8) and traj["log_probs"].shape == (5, 6)
    # score each stored step again, in a different grouping (all samples, one step at a time)
    for j in range(6):
        log_prob = policy_log_prob(
            pipe, traj["latents"][:, j], traj["latents"][:, j + 1], traj["timesteps"][:, j],
            traj["prompt_embeds"], traj["negative_embeds"], guidance_scale=5.0, eta=1.0,
        )
        assert log_prob.requires_grad
        assert (log_prob - traj["log_probs"][:, j]).abs().max().item() < 1e-5


def test_guidance_changes_the_policy(tiny_pipeline_dir):
    """CFG is part of the policy: scoring guided samples without guidance gives another log-prob."""
    pipe = load_pipeline(tiny_pipeline_dir)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], num_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unguided = policy_log_prob(pipe, traj["latents"][:, 0], traj["latents"][:, 1], traj["timesteps"][:, 0],
                                   traj["prompt_embeds"], traj["negative_embeds"], guidance_scale=1.0, eta=1.0)
    assert (unguided - traj["log_probs"][:, 0]).abs().max().item() > 1e-3


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradient(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    params = add_trainable(pipe.unet, lora_rank=4)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], num_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    block_calls = []  # a late block: its input depends on the LoRA, so the backward pass needs its activations
    pipe.unet.up_blocks[-1].resnets[0].conv1.register_forward_hook(lambda *args: block_calls.append(1))

    def gradient():
        pipe.unet.zero_grad()
        block_calls.clear()
        policy_log_prob(pipe, traj["latents"][:, 1], traj["latents"][:, 2], traj["timesteps"][:, 1],
                        traj["prompt_embeds"], traj["negative_embeds"], guidance_scale=5.0, eta=1.0).sum().backward()
        return [p.grad.clone() for p in params], len(block_calls)

    plain, plain_calls = gradient()
    pipe.unet.enable_gradient_checkpointing()
    checkpointed, checkpointed_calls = gradient()
    assert checkpointed_calls > plain_calls  # the blocks ran again during the backward pass
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

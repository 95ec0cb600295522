"""The policy's log-prob (paper, section 4.3), checked against diffusers and torch.distributions."""

import math

import pytest
import torch
from conftest import perturb_lora, recomputed_log_prob, sd14_scheduler

from machinery.pipeline import add_trainable, load_pipeline
from sampler import ddim_mean_std, step_with_logprob, sample_trajectories

NUM_STEPS = 10
SHAPE = (3, 4, 8, 8)


def diffusers_mean_and_std(scheduler, eps, t, sample, eta):
    """diffusers' own DDIM step: with zero noise it returns the mean; with unit noise mean + sigma."""
    mean = scheduler.step(
        eps, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    std = (
        scheduler.step(eps, t, sample, eta=eta, variance_noise=torch.ones_like(sample)).prev_sample
        - mean
    )
    return mean, std


# every scheduler configuration the project accepts (pipeline.load_model refuses linspace spacing, whose
# last step adds no noise, and epsilon prediction on a zero-terminal-SNR schedule)
CONFIGURATIONS = {
    "sd1-epsilon": {},
    "epsilon-trailing": {"timestep_spacing": "trailing"},
    "sd2-v": {"prediction_type": "v_prediction"},
    "v-trailing": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "v-zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    "v-trailing-zero-snr": {
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    },
}


def reference_mean_std(scheduler, model_output, t, sample, eta):
    """The DDIM step's mean and sigma from the formulas (sampler.ddim_mean_std's docstring), in
    float64, one timestep for the batch; and how far fp32 may be from that mean. 1 - abar' - sigma^2
    is >= 0 in exact arithmetic (its rounding below 0 is taken as 0). In fp32 it is off by a few
    units of 1's last place, e, whose square root moves the direction's coefficient by up to
    min(sqrt(e), e / sqrt(1 - abar' - sigma^2)): about 7e-4 where it is 0, at eta 1 on a zero-SNR
    schedule's first step (diffusers computes it the same way); about 1e-6 everywhere else."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    t_prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = alphas_cumprod[int(t)].item()
    abar_prev = (
        alphas_cumprod[t_prev].item()
        if t_prev >= 0
        else scheduler.final_alpha_cumprod.double().item()
    )
    out, x = model_output.double(), sample.double()
    if scheduler.config.prediction_type == "epsilon":
        eps, x0 = out, (x - math.sqrt(1 - abar) * out) / math.sqrt(abar)
    else:
        eps, x0 = (
            math.sqrt(abar) * out + math.sqrt(1 - abar) * x,
            math.sqrt(abar) * x - math.sqrt(1 - abar) * out,
        )
    std = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    direction = max(1 - abar_prev - std**2, 0.0)
    e = 4 * torch.finfo(torch.float32).eps
    slack = (
        min(math.sqrt(e), e / math.sqrt(direction) if direction else math.inf)
        * eps.abs().max().item()
    )
    return math.sqrt(abar_prev) * x0 + math.sqrt(direction) * eps, std, 1e-5 + slack


@pytest.mark.math
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("step", [0, NUM_STEPS // 2, NUM_STEPS - 1])  # first, middle, last (t' < 0)
@pytest.mark.parametrize("options", CONFIGURATIONS.values(), ids=CONFIGURATIONS)
def test_ddim_step_equals_the_float64_formulas_and_diffusers_step_where_it_is_finite(
    eta, step, options
):
    scheduler = sd14_scheduler(NUM_STEPS, **options)
    t = scheduler.timesteps[step]
    sample, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    # the mean: at x_{t-1} = mean each element has the Gaussian's peak density, -log(sigma) - log(2 pi) / 2
    expected_mean, expected_std, atol = reference_mean_std(scheduler, eps, t, sample, eta)
    ours, _ = step_with_logprob(
        scheduler, eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(7)
    )
    _, log_prob = step_with_logprob(
        scheduler, eps, t, sample, eta=eta, prev_sample=expected_mean.float(), reduce="none"
    )
    torch.testing.assert_close(
        log_prob.double(),
        torch.full(
            SHAPE, -math.log(expected_std) - 0.5 * math.log(2 * math.pi), dtype=torch.float64
        ),
        rtol=1e-5,
        atol=1e-4,
    )
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        ours.double(), expected_mean + expected_std * noise.double(), rtol=1e-5, atol=atol
    )
    theirs = scheduler.step(
        eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(7)
    ).prev_sample
    if torch.isfinite(
        theirs
    ).all():  # diffusers takes the square root of 1 - abar' - sigma^2 unclamped: NaN where rounding makes it < 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.math
@pytest.mark.parametrize("options", CONFIGURATIONS.values(), ids=CONFIGURATIONS)
def test_every_step_is_finite_at_every_accepted_configuration_in_fp32_and_bf16(options):
    """Every step of 10, 20 and 50, eta 0.5 and 1, the prediction and the latents in fp32 or bf16:
    the mean, sigma > 0, the drawn step and its log-prob are finite (a zero-SNR schedule's first
    step, abar = 0, included)."""
    for num_steps in (10, 20, 50):
        scheduler = sd14_scheduler(num_steps, **options)
        for dtype in (torch.float32, torch.bfloat16):
            for eta in (0.5, 1.0):
                for t in scheduler.timesteps:
                    sample, eps = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
                    mean, std = ddim_mean_std(scheduler, eps, t, sample, eta)
                    prev, log_prob = step_with_logprob(scheduler, eps, t, sample, eta=eta)
                    assert (
                        torch.isfinite(mean).all()
                        and (std > 0).all()
                        and torch.isfinite(prev).all()
                        and torch.isfinite(log_prob).all()
                    ), (num_steps, dtype, eta, int(t))


@pytest.mark.math
def test_the_direction_coefficient_is_0_where_rounding_makes_its_square_a_negative_number():
    """A zero-SNR first step (abar_t = 0) at eta 1: sigma^2 = 1 - abar', so 1 - abar' - sigma^2 is 0 in
    exact arithmetic, and in fp32 below 0 for many abar' (about a quarter of them; which ones depends
    only on IEEE rounding). For such an abar' the step is still finite: mean = sqrt(abar') x0_hat."""
    scheduler = sd14_scheduler(NUM_STEPS, **CONFIGURATIONS["v-trailing-zero-snr"])
    t = scheduler.timesteps[0]
    candidates = torch.rand(400, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    sigma = (
        (1 - candidates) / (1 - 0.0) * (1 - 0.0 / candidates)
    ).sqrt()  # as ddim_mean_std rounds it, at abar_t = 0
    negative = candidates[1 - candidates - sigma**2 < 0]
    assert len(negative) > 10  # the case the clamp is for is really exercised
    sample, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for abar_prev in negative[:10]:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.clone()
        scheduler.alphas_cumprod[t - 1000 // NUM_STEPS] = abar_prev
        assert scheduler.alphas_cumprod[t] == 0
        mean, std = ddim_mean_std(scheduler, v, t, sample, eta=1.0)
        _, log_prob = step_with_logprob(
            scheduler, v, t, sample, eta=1.0, generator=torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(log_prob).all()
        torch.testing.assert_close(
            mean, -abar_prev.sqrt() * v, rtol=0, atol=0
        )  # x0_hat = -v; the direction adds exactly 0


@pytest.mark.math
def test_a_prediction_type_without_its_maths_is_refused_in_one_line():
    for options, named in (
        ({"prediction_type": "sample"}, "'sample'"),
        ({"thresholding": True}, "thresholding"),
    ):
        with pytest.raises(ValueError, match=f"{named}.*only epsilon and v_prediction"):
            step_with_logprob(
                sd14_scheduler(NUM_STEPS, **options), torch.randn(SHAPE), 981, torch.randn(SHAPE)
            )


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
    log_prob = {
        r: step_with_logprob(scheduler, eps, t, sample, prev_sample=prev, reduce=r)[1]
        for r in ("sum", "mean", "none")
    }
    assert log_prob["none"].shape == SHAPE
    torch.testing.assert_close(log_prob["none"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob["sum"], expected.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        log_prob["mean"], log_prob["sum"] / (4 * 8 * 8), rtol=1e-6, atol=1e-6
    )


@pytest.mark.math
def test_per_sample_timesteps_equal_scalar_steps():
    scheduler = sd14_scheduler(NUM_STEPS)
    sample, eps, prev = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    steps = scheduler.timesteps[[0, 4, 9]]
    _, batched = step_with_logprob(scheduler, eps, steps, sample, prev_sample=prev)
    one_by_one = [
        step_with_logprob(
            scheduler, eps[i : i + 1], steps[i], sample[i : i + 1], prev_sample=prev[i : i + 1]
        )[1]
        for i in range(3)
    ]
    torch.testing.assert_close(batched, torch.cat(one_by_one))


@pytest.mark.math
def test_eta_zero_has_no_density():
    scheduler = sd14_scheduler(NUM_STEPS)
    with pytest.raises(ValueError, match="eta"):
        step_with_logprob(
            scheduler, torch.randn(SHAPE), scheduler.timesteps[0], torch.randn(SHAPE), eta=0.0
        )


@pytest.mark.math
def test_recomputed_log_prob_equals_sampling_log_prob_with_cfg_and_lora(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    add_trainable(pipe, lora_rank=4)
    perturb_lora(pipe.unet)
    prompts = ["a cat", "a dog", "a red fox", "an owl", "a cat"]
    traj = sample_trajectories(
        pipe,
        prompts,
        num_steps=6,
        guidance_scale=5.0,
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj["latents"].shape == (5, 7, 4, 8, 8) and traj["log_probs"].shape == (5, 6)
    # score each stored step again, in a different grouping (all samples, one step at a time)
    for j in range(6):
        log_prob = recomputed_log_prob(
            pipe,
            traj["latents"][:, j],
            traj["latents"][:, j + 1],
            traj["timesteps"][:, j],
            traj["prompt_embeds"],
            traj["negative_embeds"],
            guidance_scale=5.0,
            eta=1.0,
        )
        assert log_prob.requires_grad
        assert (log_prob - traj["log_probs"][:, j]).abs().max().item() < 1e-5


def test_guidance_changes_the_policy(tiny_pipeline_dir):
    """CFG is part of the policy: scoring guided samples without guidance gives another log-prob."""
    pipe = load_pipeline(tiny_pipeline_dir)
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog"],
        num_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        unguided = recomputed_log_prob(
            pipe,
            traj["latents"][:, 0],
            traj["latents"][:, 1],
            traj["timesteps"][:, 0],
            traj["prompt_embeds"],
            traj["negative_embeds"],
            guidance_scale=1.0,
            eta=1.0,
        )
    assert (unguided - traj["log_probs"][:, 0]).abs().max().item() > 1e-3


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradient(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    params = add_trainable(pipe, lora_rank=4)
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog"],
        num_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    block_calls = []  # a late block: its input depends on the LoRA, so the backward pass needs its activations
    pipe.unet.up_blocks[-1].resnets[0].conv1.register_forward_hook(
        lambda *args: block_calls.append(1)
    )

    def gradient():
        pipe.unet.zero_grad()
        block_calls.clear()
        recomputed_log_prob(
            pipe,
            traj["latents"][:, 1],
            traj["latents"][:, 2],
            traj["timesteps"][:, 1],
            traj["prompt_embeds"],
            traj["negative_embeds"],
            guidance_scale=5.0,
            eta=1.0,
        ).sum().backward()
        return [p.grad.clone() for p in params], len(block_calls)

    plain, plain_calls = gradient()
    pipe.unet.enable_gradient_checkpointing()
    checkpointed, checkpointed_calls = gradient()
    assert checkpointed_calls > plain_calls  # the blocks ran again during the backward pass
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_decoding_a_few_images_at_a_time_gives_the_same_images(tiny_pipeline_dir):
    """decode_batch_size is speed and memory only: the trajectories are the same draws, the images
    the same up to float rounding (each image's decode is its own)."""
    pipe = load_pipeline(tiny_pipeline_dir)
    runs = [
        sample_trajectories(
            pipe,
            ["a cat", "a dog", "a cow", "a fox", "a hen"],
            num_steps=2,
            guidance_scale=5.0,
            batch_size=5,
            generator=torch.Generator().manual_seed(0),
            decode_batch_size=size,
        )
        for size in (None, 2)
    ]
    assert torch.equal(runs[0]["latents"], runs[1]["latents"])
    assert runs[1]["images"].shape == runs[0]["images"].shape == (5, 3, 16, 16)
    assert torch.allclose(runs[1]["images"], runs[0]["images"], atol=1e-5)

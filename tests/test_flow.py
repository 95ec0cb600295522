"""The flow-matching policy (machinery/families/sd3.py): Flow-GRPO's SDE step, checked against its
formulas in float64, against diffusers' Euler step at noise level 0, against torch.distributions,
and, on a tiny SD3-shaped pipeline, against the stock StableDiffusion3Pipeline."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

import sample
import train
from machinery.families import sd3 as flow
from machinery.config import BUNDLED_FLOW_MODEL
from machinery.pipeline import load_pipeline
from sampler import step_with_logprob, gaussian_log_prob, sample_trajectories
from toy_world.sd3 import build_sd3_pipeline

SHAPE = (3, 4, 8, 8)
# SD3's shift of 3, none, a strong one, and the resolution-dependent shift of FLUX-like configs
SCHEDULERS = {
    "shift-3": dict(shift=3.0),
    "shift-1": dict(shift=1.0),
    "shift-6": dict(shift=6.0),
    "dynamic": dict(use_dynamic_shifting=True),
}


def flow_scheduler(num_steps, noise_level=0.7, **config):
    scheduler = flow.FlowSDEScheduler(**config)
    scheduler.noise_level, scheduler.image_seq_len = noise_level, 64
    scheduler.set_timesteps(num_steps)
    return scheduler


def reference_mean_std(scheduler, v, step, x, a):
    """The SDE step from its formula (the issue's and Flow-GRPO's), in float64, one step for the
    batch: x + [v + s^2 / (2t) (x + (1 - t) v)] dt, std s sqrt(-dt), s = a sqrt(t / (1 - t)) with
    the next t in 1 - t at t = 1."""
    sigmas = scheduler.sigmas.double()
    t, t_next = sigmas[step].item(), sigmas[step + 1].item()
    dt = t_next - t
    s = a * math.sqrt(t / (1 - (sigmas[1].item() if t == 1 else t)))
    v, x = v.double(), x.double()
    return x + (v + s**2 / (2 * t) * (x + (1 - t) * v)) * dt, s * math.sqrt(-dt)


@pytest.mark.math
@pytest.mark.parametrize("config", SCHEDULERS.values(), ids=SCHEDULERS)
@pytest.mark.parametrize("num_steps", [1, 2, 10, 40])
def test_noise_level_0_is_diffusers_euler_step_to_the_bit(config, num_steps):
    ours = flow_scheduler(num_steps, noise_level=0.0, **config)
    stock = FlowMatchEulerDiscreteScheduler(**config)
    stock.set_timesteps(num_steps, mu=0.8 if config.get("use_dynamic_shifting") else None)
    ours.set_timesteps(num_steps, mu=0.8 if config.get("use_dynamic_shifting") else None)
    x = torch.randn(SHAPE)
    for t in stock.timesteps:
        v = torch.randn(SHAPE)
        mean, std = flow.sde_mean_std(ours, v, t, x)
        x = stock.step(v, t, x).prev_sample
        assert torch.equal(mean, x) and (std == 0).all()


@pytest.mark.math
@pytest.mark.parametrize("config", SCHEDULERS.values(), ids=SCHEDULERS)
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_sde_step_equals_its_float64_formula_at_every_step(config, a):
    scheduler = flow_scheduler(10, noise_level=a, **config)
    for step, t in enumerate(scheduler.timesteps):
        x, v = torch.randn(SHAPE), torch.randn(SHAPE)
        mean, std = flow.sde_mean_std(scheduler, v, t, x)
        expected_mean, expected_std = reference_mean_std(scheduler, v, step, x, a)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            std.double(), torch.full_like(std.double(), expected_std), rtol=1e-5, atol=0
        )


@pytest.mark.math
@pytest.mark.parametrize("config", SCHEDULERS.values(), ids=SCHEDULERS)
@pytest.mark.parametrize("num_steps", [1, 2, 10, 40])
def test_every_step_is_finite_with_a_positive_std_for_every_shift(config, num_steps):
    """t = 1 (the first step) would divide by 1 - t = 0; the last step goes to t = 0."""
    scheduler = flow_scheduler(num_steps, **config)
    assert scheduler.sigmas[0] == 1 and scheduler.sigmas[-1] == 0
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in scheduler.timesteps:
        for dtype in (torch.float32, torch.bfloat16):
            mean, std = flow.sde_mean_std(scheduler, v.to(dtype), t, x)
            action, log_prob = step_with_logprob(
                scheduler, v.to(dtype), t, x, mean_std=flow.policy_mean_std
            )
            assert torch.isfinite(mean).all() and (std > 0).all() and torch.isfinite(std).all()
            assert torch.isfinite(action).all() and torch.isfinite(log_prob).all()


@pytest.mark.math
@pytest.mark.parametrize("step", [0, 5, 9])  # first (t = 1), middle, last (to t = 0)
def test_log_prob_is_the_normal_density_of_the_step(step):
    scheduler = flow_scheduler(10)
    t = scheduler.timesteps[step]
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    mean, std = flow.sde_mean_std(scheduler, v, t, x)
    action, log_prob = step_with_logprob(
        scheduler, v, t, x, reduce="none", mean_std=flow.policy_mean_std
    )
    expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(action.double())
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    _, mean_log_prob = step_with_logprob(
        scheduler, v, t, x, prev_sample=action, mean_std=flow.policy_mean_std
    )
    torch.testing.assert_close(
        mean_log_prob.double(), expected.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(gaussian_log_prob(action, mean, std, "none"), log_prob)


@pytest.mark.math
def test_per_sample_timesteps_equal_one_step_at_a_time():
    scheduler = flow_scheduler(10)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    steps = scheduler.timesteps[[0, 4, 9]]
    mean, std = flow.sde_mean_std(scheduler, v, steps, x)
    for i in range(3):
        one, one_std = flow.sde_mean_std(scheduler, v[i : i + 1], steps[i], x[i : i + 1])
        assert torch.equal(mean[i : i + 1], one) and torch.equal(std[i : i + 1], one_std)


@pytest.mark.math
def test_a_timestep_off_the_schedule_is_refused_not_read_as_the_first_step():
    """The step looks its t up by timestep; one not on the schedule would otherwise read as t = 1."""
    scheduler = flow_scheduler(10)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    off = (scheduler.timesteps[3] + scheduler.timesteps[4]) / 2
    with pytest.raises(ValueError, match="not all on the schedule"):
        flow.sde_mean_std(scheduler, v, torch.stack([scheduler.timesteps[0], off, off]), x)


def test_the_trajectory_at_noise_level_0_is_the_stock_sd3_pipelines(tiny_sd3_pipeline_dir):
    """With the noise level 0 every step is the Euler step: the policy's sampler then draws what
    StableDiffusion3Pipeline draws for the same x_1 and conditioning, latents and images, to the
    bit. The conditioning is SD3's encode_prompt's: the prompts' to the bit; the empty prompt's,
    encoded once rather than once a prompt, to rounding (a batch of 1 rounds its matmuls apart)."""
    pipe = load_pipeline(tiny_sd3_pipeline_dir, noise_level=0.0)
    prompts = ["a red circle", "a blue square", "an owl"]
    x_1 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(
        pipe,
        prompts,
        num_steps=4,
        guidance_scale=3.0,
        batch_size=3,
        stochastic=torch.zeros(4, dtype=torch.bool),
        initial_latents=x_1,
        policy=pipe.family.POLICY,
    )
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline_dir)
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        tokens, negative, pooled, negative_pooled = stock.encode_prompt(
            prompts, None, None, max_sequence_length=16
        )
    ours, our_negative = traj["prompt_embeds"], traj["negative_embeds"].expand(3, -1, -1)
    assert torch.equal(ours[:, :-1], tokens) and torch.equal(ours[:, -1, :64], pooled)
    torch.testing.assert_close(our_negative[:, :-1], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_negative[:, -1, :64], negative_pooled, rtol=0, atol=1e-6)
    common = dict(
        num_inference_steps=4,
        guidance_scale=3.0,
        height=16,
        width=16,
        latents=x_1,
        prompt_embeds=ours[:, :-1],
        pooled_prompt_embeds=ours[:, -1, :64],
        negative_prompt_embeds=our_negative[:, :-1],
        negative_pooled_prompt_embeds=our_negative[:, -1, :64],
    )
    latents = stock(output_type="latent", **common).images
    images = stock(output_type="pt", **common).images
    assert torch.equal(traj["latents"][:, -1], latents) and torch.equal(traj["images"], images)


@pytest.fixture
def sd3_run(tiny_sd3_pipeline_dir, tmp_path):
    """A tiny run on the SD3-shaped pipeline whose two prompts repeat, so the per-prompt reward
    buffers fill and matter."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return lambda out, epochs, *extra, model=tiny_sd3_pipeline_dir: [
        *("--model", str(model), "--out", str(out), "--epochs", str(epochs)),
        *("--samples-per-epoch", "8", "--batch-size", "2", "--num-steps", "4"),
        *("--prompts", str(prompts), "--lr", "1e-2", "--min-count", "4", "--buffer-size", "6"),
        *extra,
    ]


def metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in lines]


OPTIONS = {
    "ddpo-is-leash-eval": ["--kl-coef", "0.5", "--eval-every", "1", "--eval-samples", "3"],
    "ddpo-sf-groups-window": [
        *("--algo", "ddpo-sf", "--samples-per-prompt", "4", "--advantages", "group"),
        *("--shared-noise", "--train-window", "2"),
    ],
    "pxpo": ["--algo", "pxpo", "--reward", "pixel_color", "--pxpo-normalise", "position"],
    "rwr": ["--algo", "rwr"],
    "awm": ["--algo", "awm"],
    "nft": ["--algo", "nft"],
}


@pytest.mark.parametrize("extra", OPTIONS.values(), ids=OPTIONS)
def test_a_flow_model_trains_with_each_option_and_resumes_exactly(extra, sd3_run, tmp_path):
    """Every algorithm and extension on the SD3-shaped pipeline: finite losses and ratios, the
    policy moves, and 1 epoch then a resume equal 2 epochs straight (the prompts' reward buffers,
    --min-count 4, are in use by the second)."""
    train.main(sd3_run(tmp_path / "straight", 2, *extra))
    train.main(sd3_run(tmp_path / "resumed", 1, *extra))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    trained = [m for m in straight if "loss" in m]
    assert len(trained) == 2 and all(math.isfinite(m["loss"]) for m in trained)
    if "rwr" not in extra and "nft" not in extra:  # the two without a ratio
        assert all(math.isfinite(m["approx_kl"]) for m in trained)
    if not extra[0].startswith("--algo"):  # DDPO_IS: its clip engaged, so the policy moved
        assert max(m["clipfrac"] for m in trained) > 0
    assert metrics(tmp_path / "resumed") == straight  # every value but the wall-clock times


def test_sample_py_draws_a_flow_runs_images_beside_the_base_models(sd3_run, tmp_path):
    out = tmp_path / "run"
    train.main(sd3_run(out, 1))
    base, tuned = sample.main([str(out), "--num-images", "2", "--out", str(tmp_path / "drawn")])
    again, _ = sample.main([str(out), "--num-images", "2", "--out", str(tmp_path / "again")])
    assert (
        base.shape == tuned.shape == (2, 3, 16, 16) and (tmp_path / "drawn" / "grid.png").is_file()
    )
    assert torch.equal(base, again)  # the same seed, the same SDE noise
    assert (base - tuned).abs().max() > 0  # the LoRA, loaded by diffusers, changed the policy


@pytest.fixture(scope="module")
def sd35_shaped_dir(tmp_path_factory):
    """SD 3.5 medium's shape, saved with save_pretrained: qk_norm, a dual-attention block (MMDiT-X),
    another seed's weights."""
    path = tmp_path_factory.mktemp("tiny-sd35")
    pipe = build_sd3_pipeline(qk_norm="rms_norm", dual_attention_layers=(0,), seed=1)
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["sd3.5-shaped", "bundled"])
def test_another_saved_flow_pipeline_trains_resumes_exactly_and_its_whole_lora_loads(
    name, request, sd3_run, tmp_path
):
    """Not only the tests' fixture: an SD 3.5-shaped pipeline and the bundled toy_world/tiny-flow
    (another script's save_pretrained, shift 1) train, resume exactly, and every LoRA layer the run
    saved loads into the stock StableDiffusion3Pipeline and changes its samples."""
    model = BUNDLED_FLOW_MODEL if name == "bundled" else request.getfixturevalue("sd35_shaped_dir")
    train.main(sd3_run(tmp_path / "straight", 2, model=model))
    train.main(sd3_run(tmp_path / "resumed", 1, model=model))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    assert metrics(tmp_path / "resumed") == straight and max(m["clipfrac"] for m in straight) > 0
    base, tuned = (StableDiffusion3Pipeline.from_pretrained(model) for _ in range(2))
    lora = tmp_path / "straight" / "lora"
    tuned.load_lora_weights(lora)
    saved = [key for key in load_file(lora / "pytorch_lora_weights.safetensors") if "lora_A" in key]
    loaded = [name for name, m in tuned.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(saved) == len(loaded) > 0  # every saved layer found its module
    draw = [
        p(
            "a cat",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        )
        for p in (base, tuned)
    ]
    assert (draw[0].images - draw[1].images).abs().max() > 0

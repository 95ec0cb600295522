"""FLUX.1 as a model family (machinery/families/flux.py), on tiny FLUX-shaped pipelines built from
configurations and saved with save_pretrained (toy_world/flux.py): dev, with the guidance input,
and schnell, without. At noise level 0 a trajectory is FluxPipeline's, to the bit; the step is its
float64 formula on FLUX's schedule; every algorithm trains and resumes exactly; the LoRA loads into
the stock FluxPipeline whole and changes its samples."""

import json
import math

import pytest
import torch
from conftest import perturb_lora, recomputed_log_prob
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file
from test_flow import OPTIONS, reference_mean_std

import sample
import train
from machinery.cli import parse_args
from machinery.families import flux, sd3
from machinery.pipeline import add_trainable, autocast, load_pipeline
from sampler import sample_trajectories
from toy_world.flux import FLUX_SCHEDULER, build_flux_pipeline

PROMPTS = ["a red circle", "a blue square", "an owl"]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-flux-{request.param}")
    build_flux_pipeline(guidance=request.param == "dev").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux-dev")
    build_flux_pipeline().save_pretrained(path)
    return path


def test_the_trajectory_at_noise_level_0_is_the_stock_flux_pipelines(flux_dir):
    """With the noise level 0 every step is the Euler step: the policy's sampler draws what
    FluxPipeline draws from the same packed x_1 and conditioning (its guidance input at 3.5 for
    dev; none for schnell), latents and images, to the bit; c is FluxPipeline's encode_prompt's."""
    pipe = load_pipeline(flux_dir, noise_level=0.0)
    x_1 = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(
        pipe,
        PROMPTS,
        num_steps=4,
        guidance_scale=3.5,
        batch_size=3,
        stochastic=torch.zeros(4, dtype=torch.bool),
        initial_latents=x_1,
        policy=pipe.family.POLICY,
    )
    stock = FluxPipeline.from_pretrained(flux_dir)
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        tokens, pooled, _ = stock.encode_prompt(PROMPTS, None, max_sequence_length=16)
    c = traj["prompt_embeds"]
    assert torch.equal(c[:, :-1], tokens) and torch.equal(c[:, -1, :32], pooled)
    common = dict(
        num_inference_steps=4,
        guidance_scale=3.5,
        height=16,
        width=16,
        latents=x_1.flatten(2).transpose(1, 2),  # FluxPipeline's packed (B, tokens, 16)
        prompt_embeds=tokens,
        pooled_prompt_embeds=pooled,
    )
    latents = stock(output_type="latent", **common).images
    images = stock(output_type="pt", **common).images
    assert torch.equal(traj["latents"][:, -1].flatten(2).transpose(1, 2), latents)
    assert torch.equal(traj["images"], images)


@pytest.mark.math
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_the_schedule_is_flux_pipelines_and_the_step_its_float64_formula(num_steps):
    """FluxSDEScheduler at T steps sets FluxPipeline's sigmas (linspace(1, 1/T, T), shifted by mu
    of the image's tokens); on them every step is the SDE step's formula in float64."""
    ours = flux.FluxSDEScheduler(**FLUX_SCHEDULER)
    ours.noise_level, ours.image_seq_len = 0.7, 4096
    ours.set_timesteps(num_steps)
    stock = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    sigmas = [1.0 - k * (1 - 1 / num_steps) / max(num_steps - 1, 1) for k in range(num_steps)]
    stock.set_timesteps(sigmas=sigmas, mu=calculate_shift(4096, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(ours.sigmas, stock.sigmas, rtol=1e-6, atol=1e-7)
    generator = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, 16, 4, 4, generator=generator) for _ in range(2))
    for step, t in enumerate(ours.timesteps):
        mean, std = sd3.sde_mean_std(ours, v, t.expand(2), x)
        reference = reference_mean_std(ours, v, step, x, 0.7)
        torch.testing.assert_close(mean.double(), reference[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            std.double().flatten()[0].item(), reference[1], rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_every_step_is_finite_and_the_recomputed_log_prob_gives_ratio_1(flux_dir, mixed_precision):
    """In fp32 and under bf16 autocast (--mixed-precision bf16): finite latents and log-probs, and
    the update's recomputation of each step's log-prob equals the sampled one (ratio exactly 1)."""
    pipe = load_pipeline(flux_dir)
    add_trainable(pipe, lora_rank=4)
    perturb_lora(pipe.unet)
    with autocast(torch.device("cpu"), mixed_precision):
        traj = sample_trajectories(
            pipe,
            PROMPTS,
            num_steps=4,
            guidance_scale=3.5,
            batch_size=3,
            generator=torch.Generator().manual_seed(0),
            policy=pipe.family.POLICY,
        )
        assert torch.isfinite(traj["latents"]).all() and torch.isfinite(traj["log_probs"]).all()
        for j in range(4):
            state = [traj["latents"][:, j], traj["latents"][:, j + 1], traj["timesteps"][:, j]]
            embeds = [traj["prompt_embeds"], traj["negative_embeds"]]
            log_prob = recomputed_log_prob(pipe, *state, *embeds, 3.5, 1.0)
            assert torch.equal(log_prob, traj["log_probs"][:, j])  # ratio 1 exactly


@pytest.fixture
def flux_run(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return lambda out, epochs, model, *extra: [
        *("--model", str(model), "--out", str(out), "--epochs", str(epochs)),
        *("--samples-per-epoch", "8", "--batch-size", "2", "--num-steps", "4"),
        *("--prompts", str(prompts), "--lr", "1e-2", "--min-count", "4", "--buffer-size", "6"),
        *extra,
    ]


def metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in lines]


@pytest.mark.parametrize("extra", OPTIONS.values(), ids=OPTIONS)
def test_flux_trains_with_each_option_and_resumes_exactly(extra, dev_dir, flux_run, tmp_path):
    """Every algorithm and extension on FLUX-dev's shape: finite losses, the policy moves, and one
    epoch then a resume equal two straight."""
    train.main(flux_run(tmp_path / "straight", 2, dev_dir, *extra))
    train.main(flux_run(tmp_path / "resumed", 1, dev_dir, *extra))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    trained = [m for m in straight if "loss" in m]
    assert len(trained) == 2 and all(math.isfinite(m["loss"]) for m in trained)
    if not extra[0].startswith("--algo"):  # DDPO_IS: its clip engaged, so the policy moved
        assert max(m["clipfrac"] for m in trained) > 0
    assert metrics(tmp_path / "resumed") == straight


@pytest.fixture(scope="module")
def other_shape_dir(tmp_path_factory):
    """schnell's shape (no guidance input), deeper, another seed's weights."""
    path = tmp_path_factory.mktemp("tiny-flux-schnell-deeper")
    build_flux_pipeline(guidance=False, layers=2, single_layers=2, seed=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["dev", "schnell-deeper"])
def test_a_flux_run_resumes_exactly_and_its_whole_lora_loads_into_flux_pipeline(
    name, request, flux_run, tmp_path
):
    model = request.getfixturevalue("dev_dir" if name == "dev" else "other_shape_dir")
    train.main(flux_run(tmp_path / "straight", 2, model))
    train.main(flux_run(tmp_path / "resumed", 1, model))
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight = metrics(tmp_path / "straight")
    assert metrics(tmp_path / "resumed") == straight and max(m["clipfrac"] for m in straight) > 0
    base, tuned = (FluxPipeline.from_pretrained(model) for _ in range(2))
    lora = tmp_path / "straight" / "lora"
    tuned.load_lora_weights(lora)
    saved = [key for key in load_file(lora / "pytorch_lora_weights.safetensors") if "lora_A" in key]
    loaded = [name for name, m in tuned.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(saved) == len(loaded) > 0  # every saved layer found its module
    assert any(".ff.net.2" in key for key in saved)  # Flow-GRPO's FLUX targets, the feed-forwards
    draw = [
        p(
            "a cat",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(1),
            height=16,
            width=16,
            output_type="pt",
        )
        for p in (base, tuned)
    ]
    assert (draw[0].images - draw[1].images).abs().max() > 0


def test_sample_py_draws_a_flux_runs_images_beside_the_base_models(dev_dir, flux_run, tmp_path):
    out = tmp_path / "run"
    train.main(flux_run(out, 1, dev_dir))
    base, tuned = sample.main([str(out), "--num-images", "2", "--out", str(tmp_path / "drawn")])
    assert base.shape == tuned.shape == (2, 3, 16, 16) and (base - tuned).abs().max() > 0


def test_dev_guides_at_3_5_by_default_and_schnell_refuses_a_guidance_scale_in_one_line(
    flux_dir, flux_run, tmp_path, capsys
):
    dev = "schnell" not in flux_dir.name
    if dev:
        train.main(flux_run(tmp_path / "run", 1, flux_dir))
        assert json.loads((tmp_path / "run" / "config.json").read_text())["guidance_scale"] == 3.5
        # guidance-free NFT keeps it too: dev's guidance is an input of one forward, not CFG
        nft = parse_args(flux_run(tmp_path / "nft", 1, flux_dir, "--algo", "nft"))
        assert nft.guidance_scale == 3.5
        return
    with pytest.raises(SystemExit) as exit:
        train.main(flux_run(tmp_path / "run", 1, flux_dir, "--guidance-scale", "3.5"))
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(error) == 1 and "no guidance input" in error[0]


def test_the_preflight_passes_on_flux(dev_dir, flux_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--preflight", *flux_run(tmp_path / "run", 1, dev_dir)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("preflight:")]
    assert exit.value.code == 0 and all(" fail " not in line for line in lines), lines

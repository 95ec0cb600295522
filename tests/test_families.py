"""Each model family train.py takes, on a tiny random-weight pipeline of its shape: SD 1.x (epsilon
prediction), SD 2.x (v-prediction) and SDXL (two text encoders, added conditioning). The sampler is the family's own pipeline, the recomputed
log-prob gives ratio 1, and one epoch's LoRA loads into the stock pipeline."""

import json
import shutil

import pytest
import torch
from conftest import perturb_lora, recomputed_log_prob
from diffusers import DiffusionPipeline

import train
from machinery.pipeline import add_trainable, load_pipeline
from sampler import sample_trajectories

PROMPTS = ["a cat", "a red fox", "an owl"]


FAMILIES = {
    "sd1": "tiny_pipeline_dir",
    "sd2": "tiny_sd2_pipeline_dir",
    "sdxl": "tiny_sdxl_pipeline_dir",
    "sd3": "tiny_sd3_pipeline_dir",
}


@pytest.fixture(params=FAMILIES)
def family_dir(request):
    return request.getfixturevalue(FAMILIES[request.param])


@pytest.fixture(params=[name for name in FAMILIES if name != "sd3"])
def ddim_family_dir(request):
    """SD3 samples with its own steps, checked against its pipeline in test_flow.py."""
    return request.getfixturevalue(FAMILIES[request.param])


def test_the_sampler_is_the_familys_own_pipeline_at_eta_1(ddim_family_dir):
    """The stock pipeline draws x_T, then each step's noise, from the generator, as sample_trajectories does."""
    pipe = load_pipeline(
        ddim_family_dir
    )  # its DDIM scheduler, with the model's schedule and prediction type
    traj = sample_trajectories(
        pipe,
        PROMPTS,
        num_steps=4,
        guidance_scale=3.0,
        eta=1.0,
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
        policy=pipe.family.POLICY,
    )
    stock = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    images = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert torch.equal(traj["latents"][:, -1], stock) and torch.equal(
        traj["images"], images
    )  # to the bit, in fp32 on the CPU


def test_the_recomputed_log_prob_gives_ratio_1(family_dir):
    pipe = load_pipeline(family_dir)
    add_trainable(pipe, lora_rank=4)
    perturb_lora(pipe.unet)
    traj = sample_trajectories(
        pipe,
        PROMPTS,
        num_steps=4,
        guidance_scale=3.0,
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
        policy=pipe.family.POLICY,
    )
    for j in range(4):
        log_prob = recomputed_log_prob(
            pipe,
            traj["latents"][:, j],
            traj["latents"][:, j + 1],
            traj["timesteps"][:, j],
            traj["prompt_embeds"],
            traj["negative_embeds"],
            3.0,
            1.0,
        )
        assert torch.equal(
            log_prob, traj["log_probs"][:, j]
        )  # ratio 1 exactly: the same batch, the same computation


def test_one_epoch_of_ddpo_is_trains_and_its_lora_loads_into_the_stock_pipeline(
    family_dir, tmp_path
):
    out = tmp_path / "run"
    train.main(
        [
            "--model",
            str(family_dir),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--samples-per-epoch",
            "8",
            "--batch-size",
            "2",
            "--num-steps",
            "3",
            "--prompts",
            "simple_animals",
            "--lr",
            "1e-2",
        ]
    )
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["clipfrac"] > 0  # the updates moved the policy
    stock = DiffusionPipeline  # the family's own class, as model_index.json names it
    base, tuned = (stock.from_pretrained(family_dir) for _ in range(2))
    tuned.load_lora_weights(out / "lora")
    draw = [
        p(
            "a cat",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).images
        for p in (base, tuned)
    ]
    assert (draw[0] - draw[1]).abs().max() > 1e-4


def test_a_zero_snr_v_prediction_model_trains_an_epoch_with_finite_log_probs(
    tiny_sd2_pipeline_dir, tmp_path, monkeypatch
):
    """A zero-terminal-SNR schedule with trailing spacing (the first step at t = 999 has abar_t = 0)
    and eta 1: every sampled log-prob, the update's ratios and the weights stay finite."""
    model = tmp_path / "zero-snr"
    shutil.copytree(tiny_sd2_pipeline_dir, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(
        json.dumps(
            {
                **json.loads(config.read_text()),
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
            }
        )
    )
    sampled, sample = [], train.sample_trajectories
    monkeypatch.setattr(
        train,
        "sample_trajectories",
        lambda *args, **kw: sampled.append(sample(*args, **kw)) or sampled[-1],
    )
    out = tmp_path / "run"
    train.main(
        [
            "--model",
            str(model),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--samples-per-epoch",
            "8",
            "--batch-size",
            "2",
            "--num-steps",
            "3",
            "--prompts",
            "simple_animals",
            "--lr",
            "1e-2",
        ]
    )
    (traj,) = sampled
    assert (
        traj["timesteps"][0, 0] == 999 and load_pipeline(model).scheduler.alphas_cumprod[999] == 0
    )
    assert torch.isfinite(traj["log_probs"]).all() and torch.isfinite(traj["latents"]).all()
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["skipped_updates"] == 0 and all(
        torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "approx_kl", "clipfrac")
    )

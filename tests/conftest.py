"""Tiny random-weight pipelines with Stable Diffusion 1.x's shape, built from configs (no
downloads): CLIP tokenizer and text encoder, VAE, cross-attention UNet, and DDIM with SD v1.4's
noise schedule. Images are 16 x 16, latents 4 x 8 x 8. The UNet has one level: its attention, and
so the LoRA, sits in the middle block, where the text conditions it; a second level (as SD's four)
would double every training test's time and check nothing more.

pytest.ini runs the suite in one worker process per core (pytest-xdist): each worker computes on
one thread, and so do the processes its tests start."""

import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_world.pretrain import SD14_SCHEDULER, build_pipeline  # noqa: E402
from toy_world.sd3 import build_sd3_pipeline  # noqa: E402
from sampler import step_with_logprob, guided_prediction  # noqa: E402


def pytest_configure(config):
    if os.environ.get(
        "PYTEST_XDIST_WORKER"
    ):  # the cores are the workers': one thread each, no oversubscription
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line(
        "markers",
        "math: the log-prob maths, the losses, advantages and RWR's weights; fast (pytest -m math)",
    )


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: the suite is deterministic."""
    torch.manual_seed(0)


def sd14_scheduler(num_steps, **changes):
    """DDIM with SD v1.4's noise schedule; changes: other options of the scheduler's config (SD 2.x's v-prediction...)."""
    scheduler = DDIMScheduler(**{**SD14_SCHEDULER, **changes})
    scheduler.set_timesteps(num_steps)
    return scheduler


def recomputed_log_prob(
    pipe, latents, next_latents, timesteps, prompt_embeds, negative_embeds, guidance_scale, eta
):
    """log p_theta(a_t | s_t) of stored actions under the current weights, with gradient, as the
    update computes it: the guided prediction at the state, then the step's log-density of the
    action, both the pipeline's family's (pipe.family.POLICY)."""
    policy = pipe.family.POLICY
    state = (latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
    eps = guided_prediction(pipe.unet, *state, predict=policy.predict)
    return step_with_logprob(
        pipe.scheduler, eps, timesteps, latents, eta, next_latents, mean_std=policy.mean_std
    )[1]


def perturb_lora(unet):
    """LoRA's B starts at zero, so the adapter changes nothing: give it weights, so the policy moves away from the base."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


def tiny_pipeline(seed=0, family="sd1"):
    return build_pipeline(
        image_size=16,
        vae_channels=(16, 32),
        unet_channels=(32,),
        text_dim=32,
        max_length=16,
        seed=seed,
        family=family,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny pipeline saved in diffusers' folder format, as a user's local --model would be."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def tiny_run(tiny_pipeline_dir):
    """train.py's flags for a tiny run on the tiny pipeline: out, epochs, then more flags. Two
    batches of two images an epoch, 2 steps, one update."""
    return lambda out, epochs, *extra: [
        "--model",
        str(tiny_pipeline_dir),
        *("--samples-per-epoch", "4", "--batch-size", "2", "--updates-per-epoch", "1"),
        *("--num-steps", "2", "--prompts", "simple_animals"),
        *("--out", str(out), "--epochs", str(epochs)),
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_sd2_pipeline_dir(tmp_path_factory):
    """The same with SD 2.x's differences: v-prediction, linear attention projections."""
    path = tmp_path_factory.mktemp("tiny-sd2")
    tiny_pipeline(family="sd2").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """The same with SDXL's differences: two text encoders, the pooled embedding and size ids into the UNet."""
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_pipeline(family="sdxl").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory):
    """An SD3-shaped flow-matching pipeline (toy_world/sd3.py): two CLIP encoders and a T5, an MMDiT
    transformer of two layers, the flow-matching scheduler with SD3's shift of 3."""
    path = tmp_path_factory.mktemp("tiny-sd3")
    build_sd3_pipeline().save_pretrained(path)
    return path

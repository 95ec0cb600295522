"""Stable Diffusion 1.x, the paper's model, and 2.x: the policy is sampler.py's (SD1), the DDIM step
with eta > 0 on the UNet's noise (2.x at 768 px: its velocity, read into the same Gaussian). Here is
only how such a pipeline loads for DDPO, which steps can be the policy, and how its LoRA is saved.
"""

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

import sampler
from machinery.config import Config
from machinery.errors import fail
from machinery.families import schedules

PIPELINE = StableDiffusionPipeline
POLICY = sampler.SD1
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections
NOISE = "eta"  # the flag of the step's noise
DENOISER = "unet"  # the pipeline's name for it


def load(model, dtype, local_files_only, noise_level=None, pipeline=PIPELINE, **off):
    """The pipeline with its scheduler made DDIM (sampler.ddim_scheduler). The safety checker is
    off: it blacks out images, which a reward would learn to exploit (off: what to turn off)."""
    off = off or dict(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline.from_pretrained(model, dtype=dtype, local_files_only=local_files_only, **off)
    pipe.scheduler = sampler.ddim_scheduler(pipe.scheduler)
    return pipe


def check_steps(cfg, scheduler):
    """One line on why the model's DDIM steps cannot be the policy: a prediction the Gaussian is not
    written for, or a step that adds no noise (so has no log-prob) at --num-steps."""
    if cfg.noise_level != Config.noise_level:
        fail(
            f"--noise-level {cfg.noise_level}: a flow model's noise, but {cfg.model} samples with "
            f"DDIM, whose noise is --eta (default {Config.eta})"
        )
    prediction, thresholding = scheduler.config.prediction_type, scheduler.config.thresholding
    if prediction not in sampler.PREDICTION_TYPES or thresholding:
        fail(
            f"--model {cfg.model}: its scheduler predicts "
            f"{prediction!r}{' with thresholding' if thresholding else ''}; the policy's Gaussian "
            f"is written for {' and '.join(sampler.PREDICTION_TYPES)} without thresholding "
            "(sampler.ddim_mean_std)"
        )
    # x0_hat = (x_t - eps) / sqrt(abar_T) = (x_t - eps) / 0
    if prediction == "epsilon" and scheduler.alphas_cumprod[-1] == 0:
        fail(
            f"--model {cfg.model}: its scheduler has zero terminal SNR (rescale_betas_zero_snr) "
            "and "
            f"predicts 'epsilon', from which the clean image at t = T cannot be recovered (it "
            f"divides by sqrt(alpha-bar_T) = 0); such schedules go with "
            f'"prediction_type": "v_prediction" in scheduler/scheduler_config.json'
        )
    for flag, num_steps in schedules(cfg, scheduler):  # within the training timesteps
        trained = scheduler.config.num_train_timesteps
        offset = scheduler.config.get("steps_offset", 0)
        if scheduler.timesteps.max() >= trained:
            fail(
                f"{flag} {num_steps}: {cfg.model}'s scheduler reaches past its {trained} training "
                f"timesteps (offset {offset}); use at most {trained - offset}"
            )
        zero = torch.zeros(1, 1)
        steps = scheduler.timesteps
        _, std = sampler.ddim_mean_std(scheduler, zero, steps, zero.expand(len(steps), 1), cfg.eta)
        # e.g. timestep_spacing "linspace" ends on t = 0, whose step to the final alpha-bar adds
        # no noise
        if not (std > 0).all():
            fail(
                f"{flag} {num_steps}: with {cfg.model}'s scheduler "
                f"({scheduler.config.timestep_spacing} spacing) a step adds no noise (sigma_t = 0 "
                f"at t = {int(steps[(std.flatten() <= 0).nonzero()[0]])}), so it has no log-prob; "
                f'set timestep_spacing to "leading" or "trailing" in its '
                f"scheduler/scheduler_config.json"
            )


def save_lora(pipe, folder, layers):
    """The LoRA's layers (PEFT's state dict) in diffusers' format, for load_lora_weights."""
    type(pipe).save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(layers))

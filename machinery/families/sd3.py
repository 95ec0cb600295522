"""Stable Diffusion 3 and 3.5, flow-matching models, as a DDPO policy: Flow-GRPO's SDE step (beyond
the paper; Liu et al. 2025, arXiv 2505.05470, its ODE-to-SDE conversion). The formulas below are its
update rule as public summaries of the paper restate it and as its code computes it
(yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py); tests/test_flow.py checks
this file against them in float64. The paper's section and equation numbers could not be checked
against a full copy of it here, so none are cited.

A rectified flow samples by an ODE, x_{t+dt} = x_t + v_theta(x_t, t) dt from t = 1 (noise) to
t = 0 (data), with dt < 0 (FlowMatchEulerDiscreteScheduler.step). A deterministic step has no
density, so DDPO's MDP (sampler.py) has no policy to differentiate. Flow-GRPO replaces each Euler
step by a step of a reverse-time SDE that has the same marginals at every t:

    x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(-dt) z,
    sigma_t = a sqrt(t / (1 - t)),  z ~ N(0, I),

a Gaussian whose mean depends on theta through v, with std sigma_t sqrt(-dt): the policy's step,
with a log-prob. The noise level a (--noise-level, 0.7 in Flow-GRPO) plays the role of DDIM's eta:
at a = 0 the step is the stock Euler step. Everything else of DDPO is unchanged: the log-prob is
sampler.gaussian_log_prob of this mean and std, averaged over the latent's elements like the DDIM
one; advantages, the clipped ratio and the update are ddpo.py's and train.py's. The step's
noise is the scheduler's a, set when the model loads (--noise-level); DDIM's eta does not apply
(train.py refuses --eta for a flow model).

Two ends, handled as Flow-GRPO's code (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) does:
the first step starts at t = 1, where 1 - t = 0 makes sigma_t infinite, so its sigma_t takes the
next t in the denominator, a sqrt(1 / (1 - sigmas[1])); the last step goes to t = 0 and is an SDE
step like the others (sigma_t is finite at the last t > 0), so x_0 carries its noise. Flow-GRPO's
configuration does not train that last step (timestep_fraction 0.99 of 10 steps, in order; its
code gives no reason); here the step's maths runs in fp32, and any step may be trained.

Here t is the scheduler's sigma (t = timestep / 1000 after the model's shift), and v is the
transformer's guided prediction, classifier-free guidance as SD3's pipeline does it.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

import sampler
from machinery.config import Config
from machinery.errors import fail
from machinery.families import schedules

NOISE_LEVEL = Config.noise_level  # --noise-level's default: Flow-GRPO's a for SD3.5
NOISE = "noise_level"  # the flag of the step's noise
DENOISER = "transformer"  # the pipeline's name for it
# the transformer's attention projections, of the image and the text streams (Flow-GRPO's)
LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


class FlowSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """SD3's scheduler, its shift and schedule unchanged, made a policy: it holds the noise level a,
    and its steps look up their t by timestep (no step counter), since the update recomputes any
    stored step in any order. step() takes the SDE step at the noise level eta (default a; 0 is
    the Euler step, for the steps a sampling window leaves out, machinery/successors.py), so that
    StableDiffusion3Pipeline itself samples as the policy does (sample.py)."""

    init_noise_sigma = 1.0  # x_1 ~ N(0, I), unscaled
    noise_level = NOISE_LEVEL
    image_seq_len = None  # the transformer's tokens an image, for a resolution-dependent shift

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        if self.config.use_dynamic_shifting and kwargs.get("mu") is None:  # as SD3's pipeline
            kwargs["mu"] = calculate_shift(
                self.image_seq_len,
                self.config.get("base_image_seq_len", 256),
                self.config.get("max_image_seq_len", 4096),
                self.config.get("base_shift", 0.5),
                self.config.get("max_shift", 1.16),
            )
        super().set_timesteps(num_inference_steps, device, **kwargs)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = (1 - t) x_0 + t noise at t = timestep / 1000: the flow's path, on which RWR
        regresses (train.rwr_regression_loss)."""
        t = timesteps.float() / self.config.num_train_timesteps
        t = t.view(-1, *[1] * (noise.ndim - 1))
        return (1 - t) * original_samples + t * noise

    def get_velocity(self, sample, noise, timesteps):
        """The velocity of that path, d x_t / dt = noise - x_0: what the transformer predicts, so
        RWR's target (the pipeline declares it a velocity model, load_pipeline)."""
        return noise - sample

    def step(self, model_output, timestep, sample, eta=None, generator=None, return_dict=True, **_):
        mean, std = sde_mean_std(self, model_output, timestep, sample, eta)
        if (std > 0).any():
            mean = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device)
        return FlowMatchEulerDiscreteSchedulerOutput(mean) if return_dict else (mean,)


def step_sigmas(scheduler, timestep, sample):
    """t and the next t of each sample's step, shaped to broadcast against the latents."""
    timesteps = scheduler.timesteps.to(sample.device)
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    matches = timesteps[None, :] == t[:, None]
    if not matches.any(dim=1).all():
        raise ValueError(f"timesteps {t.tolist()} are not all on the schedule {timesteps.tolist()}")
    index = matches.int().argmax(dim=1)
    sigmas = scheduler.sigmas.to(sample.device)
    shape = (-1, *[1] * (sample.ndim - 1))
    return sigmas[index].view(shape), sigmas[index + 1].view(shape), sigmas[1]


def sde_mean_std(scheduler, model_output, timestep, sample, noise_level=None):
    """Flow-GRPO's SDE step x_t -> x_{t+dt} as a Gaussian (module docstring): its mean and std for
    the velocity model_output. noise_level: a (default: the scheduler's, which the policy takes:
    POLICY's step passes DDIM's eta on to no one). At a = 0 the mean is the Euler step x_t + v dt,
    bit for bit, and the std 0."""
    a = scheduler.noise_level if noise_level is None else noise_level
    t, t_next, t_after_first = step_sigmas(scheduler, timestep, sample)
    dt = t_next - t  # < 0: from noise towards data
    # sigma_t = a sqrt(t / (1 - t)); at t = 1 the next t in 1 - t (Flow-GRPO's code)
    sigma_t = a * (t / (1 - torch.where(t == 1, t_after_first, t))).sqrt()
    v = model_output.float()
    # x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt, grouped as Flow-GRPO's code groups it
    mean = sample * (1 + sigma_t**2 / (2 * t) * dt) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma_t * (-dt).sqrt()


def is_flow(scheduler):
    """Whether the policy is a flow model's SDE step (else DDIM's, sampler.py)."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def transformer_velocity(transformer, latents, timesteps, cond):
    """The SD3 transformer's velocity at (x_t, t, c). c carries the pooled text embedding in its
    last row (encode_prompts), so that it stays one tensor a prompt wherever trajectories keep
    it."""
    pooled = transformer.config.pooled_projection_dim
    return transformer(
        hidden_states=latents,
        timestep=timesteps,
        encoder_hidden_states=cond[:, :-1],
        pooled_projections=cond[:, -1, :pooled],
        return_dict=False,
    )[0]


def encode_prompts(pipe, prompts, guidance=False):
    """SD3's conditioning of each prompt: the two CLIP encoders' tokens beside T5's (its
    encode_prompt), and the two pooled CLIP embeddings in one more row. The guidance prompt is the
    empty prompt encoded like any other, as SD3's pipeline does."""
    length = min(256, pipe.tokenizer_3.model_max_length)  # SD3's pipeline's default, 256
    tokens, _, pooled, _ = pipe.encode_prompt(
        list(prompts),
        None,
        None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=length,
    )
    extra = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    extra[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, extra], dim=1)


class FlowPipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose transformer also answers to .unet, the name the loop and the
    machinery use for the denoiser."""

    @property
    def unet(self):
        return self.transformer


def policy_mean_std(scheduler, model_output, timestep, sample, eta=None):
    """The policy's Gaussian: the SDE step at the scheduler's noise level (eta is DDIM's: "
    "unused)."""
    return sde_mean_std(scheduler, model_output, timestep, sample)


def decode(pipe, latents):
    """sampler.decode of the VAE's shifted latents, in fp32 outside autocast."""
    with torch.autocast(latents.device.type, enabled=False):
        latents = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0)
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype)).sample
    return pipe.image_processor.postprocess(decoded.float(), output_type="pt")


POLICY = sampler.Policy(encode_prompts, transformer_velocity, policy_mean_std, decode)
PIPELINE = FlowPipeline


def load(model, dtype, local_files_only, noise_level=NOISE_LEVEL):
    """The pipeline with its scheduler made the policy's (FlowSDEScheduler at noise_level), declared
    a velocity model (RWR's target, train.rwr_regression_loss)."""
    pipe = PIPELINE.from_pretrained(model, dtype=dtype, local_files_only=local_files_only)
    pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.noise_level = noise_level
    pipe.scheduler.register_to_config(prediction_type="v_prediction")  # the flow's velocity
    patches = pipe.unet.config.sample_size // pipe.unet.config.patch_size
    pipe.scheduler.image_seq_len = patches**2
    return pipe


def check_steps(cfg, scheduler):
    """One line on why a flow model's SDE steps cannot be the policy at --num-steps: a schedule that
    does not run from t = 1 to t = 0, or a step without noise (its std must be finite and > 0)."""
    if cfg.eta != Config.eta:
        fail(
            f"--eta {cfg.eta}: DDIM's noise, but {cfg.model} is a flow model, whose SDE step's "
            f"noise is --noise-level (default {Config.noise_level})"
        )
    for flag, num_steps in schedules(cfg, scheduler):
        sigmas = scheduler.sigmas
        if scheduler.config.invert_sigmas or sigmas[0] != 1 or sigmas[-1] != 0:
            fail(
                f"--model {cfg.model}: its scheduler's t runs from {float(sigmas[0]):g} to "
                f"{float(sigmas[-1]):g}; Flow-GRPO's SDE step (machinery/families/sd3.py) is "
                "written for a flow from t = 1 (noise) to t = 0 (data), as SD3's scheduler ships"
            )
        zero = torch.zeros(len(scheduler.timesteps), 1)
        _, std = sde_mean_std(scheduler, zero, scheduler.timesteps, zero)
        if not (torch.isfinite(std) & (std > 0)).all():
            fail(
                f"{flag} {num_steps}: with {cfg.model}'s scheduler a step's std is "
                f"{std.flatten().tolist()}, so not every step has a log-prob; use more steps, or "
                "a --noise-level > 0"
            )


def save_lora(pipe, folder, layers):
    """The LoRA's layers under PEFT's names, as diffusers' SD3 LoRA scripts save them."""
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers)

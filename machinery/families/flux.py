"""FLUX.1 (Black Forest Labs), a flow-matching transformer, as a DDPO policy: Flow-GRPO's SDE step
on its schedule, machinery/families/sd3.py's, with what FLUX changes, as diffusers' FluxPipeline
does it (pipeline_flux.py) and as Flow-GRPO's FLUX code trains it (scripts/train_flux.py):

- Guidance is an input, not two forwards. FLUX.1-dev is guidance-distilled: its transformer takes
  the guidance scale w as an embedding and is called once a step, without the empty prompt. The
  policy's prediction is that one velocity, v_theta(x_t, t, c, w), and w is part of the policy as
  the paper's classifier-free w is: sampling and the update call it with the same w
  (--guidance-scale, FluxPipeline's 3.5 by default). FLUX.1-schnell has no guidance input: it is
  called once with none, and --guidance-scale is refused.
- Packed latents. The transformer sees 2 x 2 patches of the 16-channel latent as tokens, with
  their row and column as position ids (img_ids) and zeros as the text's (txt_ids). The policy's
  state is the packed latent, kept as (B, 64, h/2, w/2), each position a token and each channel
  one of its 64 features (FluxPipeline's (B, h/2 * w/2, 64), the tokens laid out on their grid):
  the SDE step's Gaussian is taken on it, its log-prob averaged over its elements as SD3's is.
- The time shift depends on the image's size: mu from the number of image tokens, over the
  sigmas linspace(1, 1/T, T), as FluxPipeline sets its schedule.
- Conditioning: T5's tokens, and CLIP's pooled embedding in one more row of c.
"""

import numpy as np
import torch
from diffusers import FluxPipeline

import sampler
from machinery.errors import fail
from machinery.families import sd3

NOISE, DENOISER, NOISE_LEVEL = sd3.NOISE, sd3.DENOISER, sd3.NOISE_LEVEL
# Flow-GRPO's FLUX LoRA (scripts/train_flux.py): the attention of both streams, and the double
# blocks' feed-forwards; "attn.to_q/k/v" also match the single blocks' attention
LORA_TARGETS = [
    *sd3.LORA_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


class FluxSDEScheduler(sd3.FlowSDEScheduler):
    """SD3's policy scheduler on FLUX's schedule: at T steps, the sigmas linspace(1, 1/T, T) shifted
    by mu of the image's tokens (FluxPipeline's), unless sigmas are given (the stock pipeline gives
    them, and its mu)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, **kwargs):
        if sigmas is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            num_inference_steps = None
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, **kwargs)


class FluxPolicyPipeline(FluxPipeline):
    """FluxPipeline whose transformer also answers to .unet, the name the loop uses."""

    @property
    def unet(self):
        return self.transformer


def encode_prompts(pipe, prompts, guidance=False):
    """c: T5's tokens (FluxPipeline's encode_prompt, its 512 tokens at most) and a last row holding
    CLIP's pooled embedding. FLUX has no guidance prompt: the empty one is encoded for the loop's
    sake and never used."""
    length = min(512, pipe.tokenizer_2.model_max_length)
    tokens, pooled, _ = pipe.encode_prompt(
        list(prompts), None, device=pipe.transformer.device, max_sequence_length=length
    )
    extra = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    extra[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, extra], dim=1)


def velocity(transformer, latents, timesteps, cond, guidance_scale):
    """The transformer's velocity at (x_t, t, c), with w as its guidance input where it has one
    (dev), none where it has not (schnell): one forward, as FluxPipeline calls it."""
    batch, features, rows, columns = latents.shape
    tokens = latents.flatten(2).transpose(1, 2).contiguous()  # (B, tokens, 64)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([batch], guidance_scale, device=latents.device, dtype=torch.float32)
    ids = FluxPipeline._prepare_latent_image_ids(batch, rows, columns, latents.device, cond.dtype)
    pooled = transformer.config.pooled_projection_dim
    text = cond[:, :-1]
    output = transformer(
        hidden_states=tokens,
        timestep=timesteps.to(tokens.dtype) / 1000,
        guidance=guidance,
        pooled_projections=cond[:, -1, :pooled],
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=cond.device, dtype=cond.dtype),
        img_ids=ids,
        return_dict=False,
    )[0]
    return output.transpose(1, 2).reshape(batch, features, rows, columns)


velocity.guidance_input = True  # sampler.guided_prediction calls it once, with w


def unpack(latents):
    """(B, 4C, h/2, w/2) packed -> (B, C, h, w), FluxPipeline._unpack_latents on the token grid."""
    batch, features, rows, columns = latents.shape
    latents = latents.view(batch, features // 4, 2, 2, rows, columns)
    return latents.permute(0, 1, 4, 2, 5, 3).reshape(batch, features // 4, 2 * rows, 2 * columns)


def decode(pipe, latents):
    """SD3's decode (the VAE's scaling and shift, in fp32) of the unpacked latents."""
    return sd3.decode(pipe, unpack(latents))


POLICY = sampler.Policy(encode_prompts, velocity, sd3.policy_mean_std, decode)
PIPELINE = FluxPolicyPipeline


def load(model, dtype, local_files_only, noise_level=NOISE_LEVEL):
    """The pipeline with FluxSDEScheduler at noise_level, a velocity model (RWR's target). Images
    are the VAE's own size (FLUX.1's: 1024 px, FluxPipeline's default): the transformer's config
    gains sample_size, the side of that size's token grid (64), which the sampler draws x_1 at."""
    pipe = PIPELINE.from_pretrained(model, dtype=dtype, local_files_only=local_files_only)
    pipe.scheduler = FluxSDEScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.noise_level = noise_level
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.default_sample_size = pipe.vae.config.sample_size // pipe.vae_scale_factor  # its own
    side = pipe.default_sample_size // 2  # pipe(prompt) too draws at that size (sample.py)
    pipe.transformer.register_to_config(sample_size=side)
    pipe.scheduler.image_seq_len = side**2
    pipe.scheduler.guidance_input = pipe.transformer.config.guidance_embeds  # for check_steps
    return pipe


def check_steps(cfg, scheduler):
    """sd3.check_steps on FLUX's schedule; a --guidance-scale for a model without a guidance input
    (schnell, whose settings set it to 1, no guidance) is refused."""
    sd3.check_steps(cfg, scheduler)
    if not scheduler.guidance_input and cfg.guidance_scale != 1:
        fail(
            f"--guidance-scale {cfg.guidance_scale}: {cfg.model} has no guidance input "
            "(FLUX.1-schnell is not guidance-distilled); leave the flag out, or give 1 (none)"
        )


def save_lora(pipe, folder, layers):
    """The LoRA's layers under PEFT's names, as diffusers' FLUX LoRA scripts save them."""
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers)

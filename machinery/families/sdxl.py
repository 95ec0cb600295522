"""Stable Diffusion XL: the paper's DDIM policy (sampler.py) on a UNet that sees more than tokens.
Its two text encoders' tokens are c, and the UNet is also conditioned on the pooled embedding and
on the image's size and crop; these travel in one more row of c, so that c stays one tensor a
prompt wherever the trajectories keep it. Its VAE decodes in fp32 (it overflows in fp16).
"""

import torch
from diffusers import StableDiffusionXLPipeline

import sampler
from machinery.families import sd

PIPELINE = StableDiffusionXLPipeline
LORA_TARGETS, NOISE, DENOISER = sd.LORA_TARGETS, sd.NOISE, sd.DENOISER
check_steps, save_lora = sd.check_steps, sd.save_lora


def encode_prompts(pipe, prompts, guidance=False):
    """c: both encoders' tokens, and a last row holding the pooled embedding and the time ids
    (H, W), (0, 0), (H, W), its pipeline's defaults. Its guidance prompt is zeros, as its
    force_zeros_for_empty_prompt makes it."""
    device = pipe.unet.device
    tokens, _, pooled, _ = pipe.encode_prompt(
        list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    if guidance and pipe.config.force_zeros_for_empty_prompt:
        tokens, pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ids = torch.tensor([size, size, 0, 0, size, size], dtype=tokens.dtype, device=device)
    extra = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=device)
    extra[:, 0, : pooled.shape[-1]] = pooled
    extra[:, 0, pooled.shape[-1] : pooled.shape[-1] + 6] = ids
    return torch.cat([tokens, extra], dim=1)


def unet_eps(unet, latents, timesteps, cond):
    """The UNet's prediction at (x_t, t, c), c's last row taken apart (encode_prompts)."""
    time_ids = 6 * unet.config.addition_time_embed_dim
    pooled = unet.add_embedding.linear_1.in_features - time_ids  # the pooled embedding's width
    added = {"text_embeds": cond[:, -1, :pooled], "time_ids": cond[:, -1, pooled : pooled + 6]}
    return unet(latents, timesteps, cond[:, :-1], added_cond_kwargs=added).sample


def decode(pipe, latents):
    """sampler.decode with the VAE in fp32, outside autocast."""
    with torch.autocast(latents.device.type, enabled=False):
        return sampler.decode(pipe, latents)


POLICY = sampler.Policy(encode_prompts, unet_eps, sampler.ddim_mean_std, decode)


def load(model, dtype, local_files_only, noise_level=None):
    """sd.load without the invisible watermark (a reward could learn it too), the VAE in fp32."""
    pipe = sd.load(model, dtype, local_files_only, pipeline=PIPELINE, add_watermarker=False)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    return pipe

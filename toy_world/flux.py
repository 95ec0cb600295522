"""FLUX.1's shape, scaled down, with random weights (no download), for the tests: a CLIP text
encoder (its pooled embedding conditions the transformer) and a T5 encoder, a 4-channel VAE with
FLUX's scaling and shift, a FluxTransformer2DModel of a few double and single blocks, with the
guidance input (dev) or without (schnell), and FLUX.1-dev's scheduler (dynamic shifting)."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

from toy_world.pretrain import clip_config, make_tokenizer, make_vae
from toy_world.sd3 import make_t5_tokenizer, t5_config

# FLUX.1-dev's scheduler, as its scheduler_config.json ships it
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_flux_pipeline(
    image_size=16,
    vae_channels=(16, 32),
    text_dim=32,
    layers=1,
    single_layers=1,
    heads=2,
    head_dim=8,
    guidance=True,
    words=(),
    max_length=16,
    seed=0,
):
    """A random-weight FLUX-shaped pipeline: the VAE downsamples by 2 ** (len(vae_channels) - 1),
    the transformer takes 2 x 2 patches of its 4-channel latent as 16 features a token; guidance:
    the guidance input of FLUX.1-dev (False: schnell's shape)."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words, max_length)
    t5_tokenizer = make_t5_tokenizer(words, max_length)
    t5 = t5_config(t5_tokenizer, text_dim)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=guidance,
        axes_dims_rope=(2, 2, head_dim - 4),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=make_vae(image_size, vae_channels, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config(tokenizer, text_dim))),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )

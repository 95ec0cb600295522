"""A tiny random-weight pipeline with Stable Diffusion 1.x's shape, built from configs (no
downloads): CLIP tokenizer and text encoder, VAE, cross-attention UNet, and DDIM with SD v1.4's
noise schedule. Images are 16 x 16, latents 4 x 8 x 8."""
import string
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# SD v1.4's scheduler config, as shipped with the model, switched to DDIM by sampler.load_pipeline
SD14_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
)


def sd14_scheduler(num_steps):
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    scheduler.set_timesteps(num_steps)
    return scheduler


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    chars = sorted(set(string.ascii_lowercase + string.digits + "-,'"))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]  # one token a character
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD14_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny pipeline saved in diffusers' folder format, as a user's local --model would be."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline().save_pretrained(path)
    return path

"""Stable Diffusion 3's shape, scaled down, with random weights (no download): two CLIP text
encoders with projections (their pooled embeddings condition the transformer), a T5 encoder with a
tokenizer built by the tokenizers library, a VAE with SD3's shift, an MMDiT transformer of a few
layers, and the flow-matching Euler scheduler with SD3's shift of 3."""

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from toy_world.pretrain import make_tokenizer

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # as SD3 medium's ships


def make_t5_tokenizer(words, max_length=8):
    """A T5 (Unigram) tokenizer that reads each given word as one token and any other text as
    characters: pad 0, end of sequence 1, unknown 2, as T5's."""
    chars = sorted(set(string.ascii_lowercase + string.digits + "-,.'"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [(piece, -5.0) for c in chars for piece in (c, "\u2581" + c)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_sd3_pipeline(
    image_size=16,
    vae_channels=(16, 32),
    text_dim=32,
    layers=2,
    heads=4,
    head_dim=8,
    patch_size=1,
    words=(),
    max_length=16,
    seed=0,
):
    """A random-weight SD3-shaped pipeline; the VAE downsamples by 2 ** (len(vae_channels) - 1)
    and the transformer cuts the latent into patch_size x patch_size tokens."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words, max_length)
    clip = dict(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=text_dim,
    )
    t5_tokenizer = make_t5_tokenizer(words, max_length)
    t5 = T5Config(
        vocab_size=len(t5_tokenizer.get_vocab()),
        d_model=2 * text_dim,  # SD3 pads the two CLIP encoders' tokens to T5's width
        d_kv=8,
        d_ff=4 * text_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=1.5305,  # SD3's VAE's
        shift_factor=0.0609,
    )
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text_dim,
        pos_embed_max_size=latent_size // patch_size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=t5_tokenizer,
    )

"""Pretrain the bundled tiny text-to-image model on the toy world (toy_world.py), on a CPU.

    python -m toy_world.pretrain --out toy_world/tiny-shapes      # the shipped model: under an hour on 2 cores

The result has Stable Diffusion 1.x's shape, scaled down: a CLIP tokenizer (one token a word of
the world, characters otherwise) and text encoder, a VAE (64 x 64 images <-> 4 x 8 x 8 latents,
a factor 8 as in SD), a cross-attention UNet, and DDIM on SD v1.4's noise schedule. Phase 1 trains
the VAE; phase 2 trains the UNet and text encoder on the VAE's latents with the usual noise-
prediction loss, dropping 10 % of the captions so that classifier-free guidance works.
"""

import argparse
import dataclasses
import os
import string
import time
from dataclasses import dataclass

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup, get_scheduler
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import toy_world

# SD v1.4's noise schedule, as its scheduler config ships it
SD14_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
)


@dataclass
class Config:
    out: str = "toy_world/tiny-shapes"
    seed: int = 0
    vae_steps: int = 3500
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    edge_weight: float = 3.0
    edge_steps: int = 1200  # the last VAE steps, once the squared error is small
    latent_channels: int = 4  # SD 1.x's; SD3 and FLUX have 16
    dataset_size: int = 20000  # images encoded once for phase 2
    unet_steps: int = 4500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ink_weight: float = 0.0  # the ink's latent cells weigh 1 + this in phase 2's loss
    unet_schedule: str = "cosine"  # or constant_with_warmup: step N's model is an N-step run's
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    save_every: int = 1000


def make_tokenizer(words, max_length=8, symbols="-,.'"):
    """A CLIP BPE tokenizer whose merges spell each given word as one token; any other text
    falls back to single characters (letters, digits and the symbols)."""
    chars = sorted(set(string.ascii_lowercase + string.digits + symbols))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: r e d</w> -> re d</w> -> red</w>
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=max_length
    )


def clip_config(tokenizer, text_dim, text_layers=2):
    """A small CLIP text encoder's config for the tokenizer: width text_dim, 4 heads."""
    return dict(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def make_vae(image_size, vae_channels, latent_channels=4, **options):
    """A random-weight VAE: 3 x image_size^2 images <-> latents, downsampling by
    2 ** (len(vae_channels) - 1); options: more of its config (SD3's scaling and shift)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=8,
        sample_size=image_size,
        **options,
    )


def build_pipeline(
    image_size=64,
    vae_channels=(16, 32, 64, 64),
    unet_channels=(32, 64, 64),
    text_dim=64,
    text_layers=2,
    words=(),
    max_length=8,
    seed=0,
    family="sd1",
    latent_channels=4,
    symbols="-,.'",
):
    """A random-weight SD-1.x-shaped pipeline; the VAE downsamples by 2 ** (len(vae_channels) - 1).
    family "sd2": SD 2.x's differences, v-prediction and linear projections in the UNet's attention.
    family "sdxl": SDXL's, a second text encoder (with a projection: the pooled embedding) whose
    tokens join the first's, and a UNet that also takes the pooled embedding and 6 size and crop ids."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words, max_length, symbols)
    text_config = clip_config(tokenizer, text_dim, text_layers)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae = make_vae(image_size, vae_channels, latent_channels)
    attention = ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1)
    xl = (
        dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + text_dim,
            cross_attention_dim=2 * text_dim,
        )
        if family == "sdxl"
        else {}
    )
    unet = UNet2DConditionModel(
        **{
            "sample_size": image_size // 2 ** (len(vae_channels) - 1),
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "block_out_channels": unet_channels,
            "layers_per_block": 1,
            "down_block_types": attention + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1),
            "cross_attention_dim": text_dim,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "use_linear_projection": family != "sd1",
            **xl,
        }
    )
    scheduler = DDIMScheduler(
        **{**SD14_SCHEDULER, **({"prediction_type": "v_prediction"} if family == "sd2" else {})}
    )
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**text_config, projection_dim=text_dim)
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_vae(vae, cfg, rng, world=toy_world):
    """Phase 1: reconstruct world images through the 4 x 8 x 8 latent: squared error on the
    posterior mean (sampling the posterior at its initial std of 1 drowns the signal and stalls a
    short CPU run), plus a tiny KL that keeps the latents near unit scale. The shape's pixels (the
    saturated ones; backgrounds are neutral) weigh 5 times more: they are what the prompt names,
    but a small part of the image, and without the weight a short run blurs red and blue together.
    For the last edge_steps, an L1 term on the error's horizontal and vertical differences stops
    the decoder from painting faint patterns on plain backgrounds: they barely move the squared
    error, but JPEG pays for every edge, and they would put a floor under the JPEG reward well
    above the world's own. (From the start, it would dominate the squared error and slow it.)"""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 100, cfg.vae_steps)
    start = time.time()
    for step in range(cfg.vae_steps):
        images = torch.from_numpy(world.sample_batch(cfg.vae_batch, rng)[0]) * 2 - 1
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        saturation = images.amax(dim=1, keepdim=True) - images.amin(
            dim=1, keepdim=True
        )  # in [-1, 1] units
        weight = 1 + 4 * (saturation > 0.6).float()
        error = reconstruction - images
        edge_weight = cfg.edge_weight if step >= cfg.vae_steps - cfg.edge_steps else 0.0
        edges = (error.diff(dim=2).abs().mean() + error.diff(dim=3).abs().mean()) * edge_weight
        loss = (weight * error**2).mean() + edges + cfg.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            print(
                f"vae step {step}: mse {F.mse_loss(reconstruction, images).item():.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )


@torch.no_grad()
def encode_dataset(vae, cfg, rng, world=toy_world):
    """Encode a fixed set of world images once: latents (posterior means), captions, and where
    the ink is: a mask (N, 1, h, w) of the latent cells whose pixels include a saturated one (the
    shape's or the word's; the backgrounds are neutral)."""
    latents, prompts, ink = [], [], []
    for _ in range(cfg.dataset_size // 250):
        images, batch_prompts = world.sample_batch(250, rng)
        images = torch.from_numpy(images)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mode())
        prompts.extend(batch_prompts)
        saturated = (images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True)) > 0.3
        ink.append(F.adaptive_max_pool2d(saturated.float(), latents[-1].shape[-2:]))
    return torch.cat(latents), prompts, torch.cat(ink)


def train_unet(pipe, dataset, prompts, ink, cfg, rng):
    """Phase 2: the noise-prediction loss ||eps - eps_theta(x_t, t, c)||^2 on scaled latents,
    training the UNet and the text encoder together, with EMA weights kept for sampling. With
    cfg.ink_weight, the latent cells with ink weigh 1 + ink_weight in it: a word's letters are a
    few cells of the latent, and which word the caption asks for barely moves the plain loss
    (measured on the words world: 0.0355 against 0.0354 at t = 300 with the wrong word), so the
    model learns to draw the world's words long before it learns to draw the one asked for."""
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    pipe.unet.requires_grad_(True), pipe.text_encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    schedule = get_scheduler(
        cfg.unet_schedule, optimizer, num_warmup_steps=200, num_training_steps=cfg.unet_steps
    )
    ema = EMAModel(params, decay=cfg.ema_decay)
    scaling = pipe.vae.config.scaling_factor
    start = time.time()
    for step in range(cfg.unet_steps):
        rows = rng.integers(len(prompts), size=cfg.unet_batch)
        latents = dataset[rows] * scaling
        captions = ["" if rng.random() < cfg.caption_dropout else prompts[i] for i in rows]
        ids = pipe.tokenizer(
            captions,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(rows),))
        noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample
        if cfg.ink_weight:
            loss = ((1 + cfg.ink_weight * ink[rows]) * (prediction - noise) ** 2).mean()
        else:
            loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        ema.step(params)
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            print(
                f"unet step {step}: loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True
            )
        if (step + 1) % cfg.save_every == 0 or step == cfg.unet_steps - 1:
            ema.store(params), ema.copy_to(params)
            pipe.save_pretrained(cfg.out)
            ema.restore(params)
            print(f"saved step {step + 1} to {cfg.out}", flush=True)
    pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False)


def parse_config(config_class, argv, description):
    """A pretraining's settings: each field of its config dataclass a flag."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_class):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default)
    return config_class(**vars(parser.parse_args(argv)))


def pretrain(pipe, cfg, world=toy_world):
    """Both phases on a world (a module with sample_batch(n, rng)): the VAE, then the UNet and
    text encoder on its latents."""
    rng = np.random.default_rng(cfg.seed)
    print(
        f"parameters: unet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M, "
        f"vae {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.2f}M",
        flush=True,
    )
    train_vae(pipe.vae, cfg, rng, world)
    pipe.vae.save_pretrained(f"{cfg.out}/vae")  # inspectable before phase 2 ends
    dataset, prompts, ink = encode_dataset(pipe.vae, cfg, rng, world)
    pipe.vae.register_to_config(
        scaling_factor=1 / dataset.std().item()
    )  # unit-variance latents, as SD's 0.18215
    pipe.vae.requires_grad_(False)
    train_unet(pipe, dataset, prompts, ink, cfg, rng)
    return pipe


def main(argv=None):
    cfg = parse_config(Config, argv, __doc__)
    words = ["a", *toy_world.COLOURS, *toy_world.SHAPES]
    return pretrain(build_pipeline(image_size=toy_world.SIZE, words=words, seed=cfg.seed), cfg)


if __name__ == "__main__":
    main()

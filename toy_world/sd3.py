"""Stable Diffusion 3's shape, scaled down, and its pretraining on the toy world with the
flow-matching loss, on a CPU.

    python -m toy_world.sd3 --out toy_world/tiny-flow      # the bundled flow model

build_sd3_pipeline makes the shape with random weights (no download): two CLIP text encoders with
projections (their pooled embeddings condition the transformer), a T5 encoder with a tokenizer
built by the tokenizers library, a VAE with SD3's shift, an MMDiT transformer of a few layers, and
the flow-matching Euler scheduler. The pretraining is the bundled DDIM model's recipe
(toy_world/pretrain.py) with the flow-matching loss: it reuses that model's trained VAE (the same
world's images, the same 4 x 8 x 8 latents), then trains the transformer and the three text
encoders together on x_t = (1 - t) x_0 + t noise to predict the velocity noise - x_0, t drawn
logit-normal as SD3 trains, with 10 % of the captions dropped so that guidance works.
"""

import string
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

import toy_world
from toy_world.pretrain import (
    clip_config,
    encode_dataset,
    make_tokenizer,
    make_vae,
    parse_config,
)

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # as SD3 medium's ships


def make_t5_tokenizer(words, max_length=8):
    """A T5 (Unigram) tokenizer that reads each given word as one token and any other text as
    characters: pad 0, end of sequence 1, unknown 2, as T5's."""
    chars = sorted(set(string.ascii_lowercase + string.digits + "-,.'"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [(piece, -5.0) for c in chars for piece in (c, "\u2581" + c)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def t5_config(tokenizer, text_dim):
    """A small T5 encoder's config for the tokenizer, twice text_dim wide (SD3 pads the two CLIP
    encoders' tokens to T5's width; FLUX's transformer projects T5's tokens from it)."""
    return T5Config(
        vocab_size=len(tokenizer.get_vocab()),
        d_model=2 * text_dim,
        d_kv=8,
        d_ff=4 * text_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


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
    shift=SD3_SCHEDULER["shift"],
    vae=None,
    qk_norm=None,
    dual_attention_layers=(),
):
    """A random-weight SD3-shaped pipeline; the VAE (or the one given) downsamples by
    2 ** (len(vae_channels) - 1) and the transformer cuts the latent into patch_size x patch_size
    tokens. SD 3.5's transformers add qk_norm="rms_norm" and (medium) dual_attention_layers, the
    blocks with a second self-attention on the image's tokens (MMDiT-X)."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words, max_length)
    clip = dict(clip_config(tokenizer, text_dim), projection_dim=text_dim)
    t5_tokenizer = make_t5_tokenizer(words, max_length)
    t5 = t5_config(t5_tokenizer, text_dim)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    # SD3's VAE's scaling and shift
    vae = vae or make_vae(image_size, vae_channels, scaling_factor=1.5305, shift_factor=0.0609)
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
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**{**SD3_SCHEDULER, "shift": shift}),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=t5_tokenizer,
    )


@dataclass
class Config:
    out: str = "toy_world/tiny-flow"
    seed: int = 0
    vae: str = "toy_world/tiny-shapes/vae"  # the bundled DDIM model's, trained on the same world
    dataset_size: int = 20000  # images encoded once
    steps: int = 4500
    batch: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    save_every: int = 1000
    text_dim: int = 32  # each CLIP encoder's width; T5's is twice it
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    shift: float = 1.0  # SD3's 3 is for 1024 px; 64 tokens an image need none


def train_flow(pipe, dataset, prompts, cfg, rng):
    """The flow-matching loss ||(noise - x_0) - v_theta(x_t, t, c)||^2 on scaled latents, the
    transformer and the three text encoders trained together, with EMA weights kept for sampling."""
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for m in (pipe.transformer, *encoders) for p in m.parameters()]
    for module in (pipe.transformer, *encoders):
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    vae = pipe.vae.config
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for step in range(cfg.steps):
        rows = rng.integers(len(prompts), size=cfg.batch)
        x_0 = (dataset[rows] - vae.shift_factor) * vae.scaling_factor
        captions = ["" if rng.random() < cfg.caption_dropout else prompts[i] for i in rows]
        tokens, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
        noise = torch.randn(x_0.shape, generator=generator)
        t = compute_density_for_timestep_sampling(
            "logit_normal", cfg.batch, logit_mean=0.0, logit_std=1.0, generator=generator
        ).view(-1, 1, 1, 1)
        x_t = (1 - t) * x_0 + t * noise
        velocity = pipe.transformer(
            hidden_states=x_t,
            timestep=t.flatten() * pipe.scheduler.config.num_train_timesteps,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x_0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        ema.step(params)
        if step % 100 == 0 or step == cfg.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
            ema.store(params), ema.copy_to(params)
            pipe.save_pretrained(cfg.out)
            ema.restore(params)
    for module in (pipe.transformer, *encoders):
        module.requires_grad_(False)


def main(argv=None):
    cfg = parse_config(Config, argv, __doc__)
    rng = np.random.default_rng(cfg.seed)
    vae = AutoencoderKL.from_pretrained(cfg.vae).requires_grad_(False)
    dataset, prompts, _ = encode_dataset(vae, cfg, rng)
    # SD3's latents are shifted, then scaled: to zero mean and unit variance here
    vae.register_to_config(shift_factor=dataset.mean().item())
    vae.register_to_config(scaling_factor=1 / (dataset - dataset.mean()).std().item())
    words = ["a", *toy_world.COLOURS, *toy_world.SHAPES]
    pipe = build_sd3_pipeline(
        image_size=toy_world.SIZE,
        vae_channels=vae.config.block_out_channels,
        text_dim=cfg.text_dim,
        layers=cfg.layers,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        words=words,
        max_length=8,
        seed=cfg.seed,
        shift=cfg.shift,
        vae=vae,
    )
    sizes = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    }
    print("parameters:", ", ".join(f"{k} {v:.2f}M" for k, v in sizes.items()), flush=True)
    train_flow(pipe, dataset, prompts, cfg, rng)
    return pipe


if __name__ == "__main__":
    main()

"""Fine-tune a Stable Diffusion 1.x UNet with DDPO (Black et al. 2023). One epoch is:
sample trajectories -> reward -> advantages -> minibatch updates -> log.

    python train.py --reward jpeg                      # SD v1.4 on CUDA, else the bundled CPU model
    python train.py --model CompVis/stable-diffusion-v1-4 --reward jpeg_incompressibility

Defaults are the paper's SD v1.4 settings; with the bundled model the preset "tiny" scales them to a
CPU (every flag given still wins). The policy and its log-prob are in sampler.py, advantages and
losses in ddpo.py, rewards in rewards.py.
"""
import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

for library in ("TRANSFORMERS", "DIFFUSERS"):  # before they are imported: keep the console for results
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

import ddpo
import toy_world
from rewards import REWARDS, scalar
from run_folder import log_epoch, write_config
from sampler import add_trainable, load_pipeline, policy_log_prob, sample_trajectories, save_weights

DATA = Path(__file__).parent / "data"
BUNDLED_MODEL = Path(__file__).parent / "models" / "tiny-shapes"
SD14 = "CompVis/stable-diffusion-v1-4"


def read_lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


PROMPT_SETS = {
    "imagenet_animals": lambda: read_lines(DATA / "imagenet_classes.txt")[:398],
    "simple_animals": lambda: read_lines(DATA / "simple_animals.txt"),
    "shapes": lambda: toy_world.PROMPTS,
}
# The paper's settings scaled to the bundled model on a 2-core CPU (README, "The CPU demo"). The
# clip range grows by sqrt(16384 / 256) = 8: the mean log-ratio over the 256 latent elements of a
# 4 x 8 x 8 latent is that much noisier than over SD's 16,384.
PRESETS = {
    "paper": {},
    "tiny": dict(prompts="shapes", num_steps=20, guidance_scale=3.0, epochs=45, samples_per_epoch=64, batch_size=16,
                 timestep_fraction=0.5, lr=1e-2, clip_range=8e-4),
}
ALGOS = ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse", "pxpo")


def arg(default, help, **kwargs):
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class Config:
    # model
    model: str = arg("auto", f"hub id or local folder of a Stable Diffusion 1.x pipeline; auto: {SD14} with CUDA, else the bundled {BUNDLED_MODEL.name}")
    preset: str = arg("auto", "settings to start from: the paper's, or tiny for the bundled model on a CPU; auto: tiny with the bundled model", choices=("auto", *PRESETS))
    lora_rank: int = arg(4, "rank of the LoRA on the UNet's attention projections; 0 fine-tunes the whole UNet")
    # task
    reward: str = arg("jpeg", "reward function", choices=tuple(REWARDS))
    prompts: str = arg("imagenet_animals", f"a built-in prompt set ({', '.join(PROMPT_SETS)}) or a text file, one prompt a line")
    # sampling (paper, section 5: DDIM, 50 steps, eta 1, guidance 5)
    num_steps: int = arg(50, "DDIM steps T per trajectory")
    guidance_scale: float = arg(5.0, "classifier-free guidance weight w, part of the policy")
    eta: float = arg(1.0, "DDIM noise level; must be > 0 for the step to have a log-prob")
    # algorithm (paper, section 4 and DESIGN.md section 5)
    algo: str = arg("ddpo-is", "DDPO_IS (clipped importance sampling), DDPO_SF (REINFORCE), reward-weighted regression "
                    "(dense or top 10 %%), or pixel-wise PXPO (ddpo.py)", choices=ALGOS)
    epochs: int = arg(100, "epochs, each one round of sampling and updates")
    samples_per_epoch: int = arg(256, "trajectories sampled per epoch")
    batch_size: int = arg(8, "trajectories per forward pass, sampling and training (memory only, not the maths)")
    updates_per_epoch: int = arg(None, "optimiser steps per epoch; default 4 for ddpo-is and rwr (minibatches of 64), 1 for ddpo-sf and pxpo")
    timestep_fraction: float = arg(1.0, "fraction of each trajectory's steps trained on, drawn per sample")
    clip_range: float = arg(1e-4, "PPO clip range eps on the per-element (mean-reduced) ratio")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    per_prompt_stat_tracking: bool = arg(True, "normalise rewards per prompt (else over the batch); rwr: weights per prompt")
    buffer_size: int = arg(32, "rewards kept per prompt for its statistics")
    min_count: int = arg(16, "rewards a prompt needs before its own statistics replace the batch's")
    beta: float = arg(0.2, "rwr: inverse temperature of the weights exp(beta * r)")
    target_color: str = arg("1,1,1", "pixel_color: the target colour as R,G,B in [0, 1]")
    # optimiser (AdamW, paper's settings)
    lr: float = arg(None, "learning rate; default 3e-4 with LoRA, 1e-5 for the whole UNet")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient norm clip")
    # system
    seed: int = arg(0, "seed for prompts, noise, shuffling and LoRA init")
    out: str = arg(None, "run folder; default runs/<reward>-<algo>-<time>")
    mixed_precision: str = arg("no", "autocast the frozen networks and UNet forwards", choices=("no", "fp16", "bf16"))
    device: str = arg(None, "torch device; default cuda when available, else cpu")


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line, exit status 2
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        meta["help"] += "" if f.default is None else f" (default: {f.default})"
        if f.type is bool:
            meta["action"] = argparse.BooleanOptionalAction
        else:
            meta.setdefault("type", f.type)
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **meta)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    model, preset = given.pop("model", "auto"), given.pop("preset", "auto")
    if model == "auto":
        model = SD14 if torch.cuda.is_available() else str(BUNDLED_MODEL)
        why = f"CUDA is available, so {SD14}" if torch.cuda.is_available() else "no CUDA device, so the bundled CPU model models/tiny-shapes"
        print(f"--model auto: {why} (choose with --model)")
    if preset == "auto":
        preset = "tiny" if Path(model).resolve() == BUNDLED_MODEL.resolve() else "paper"
    cfg = Config(**{**PRESETS[preset], **given, "model": model, "preset": preset})
    # derived values, computed once
    cfg.updates_per_epoch = cfg.updates_per_epoch or (1 if cfg.algo in ("ddpo-sf", "pxpo") else 4)
    cfg.lr = cfg.lr or (3e-4 if cfg.lora_rank > 0 else 1e-5)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.out = cfg.out or f"runs/{cfg.reward}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    validate(cfg)
    return cfg


def validate(cfg):
    """Refuse bad input before anything is loaded or written."""
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("num_steps", "epochs", "samples_per_epoch", "batch_size", "updates_per_epoch", "buffer_size", "min_count"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eta", "clip_range", "lr", "adv_clip_max", "beta"):
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    try:
        target = [float(v) for v in cfg.target_color.split(",")]
    except ValueError:
        target = []
    if len(target) != 3 or not all(0 <= v <= 1 for v in target):
        fail(f"--target-color must be three numbers in [0, 1] as R,G,B, got {cfg.target_color!r}")
    if cfg.lora_rank < 0:
        fail(f"--lora-rank must be >= 0 (0 = whole UNet), got {cfg.lora_rank}")
    if not 0 < cfg.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1], got {cfg.timestep_fraction}")
    if cfg.samples_per_epoch % (cfg.updates_per_epoch * cfg.batch_size):
        fail(f"--samples-per-epoch ({cfg.samples_per_epoch}) must be a multiple of --updates-per-epoch x --batch-size ({cfg.updates_per_epoch} x {cfg.batch_size})")
    if cfg.mixed_precision == "fp16" and not cfg.device.startswith("cuda"):
        fail("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        fail(f"--out {cfg.out} is not empty; choose a new folder")
    load_prompts(cfg.prompts)


def load_prompts(name):
    """A built-in prompt set (data/README.md) or a text file, one prompt a line."""
    if name in PROMPT_SETS:
        return PROMPT_SETS[name]()
    if not Path(name).is_file():
        fail(f"--prompts {name}: no such set or file; use one of {', '.join(PROMPT_SETS)} or a text file")
    prompts = read_lines(name)
    if not prompts:
        fail(f"--prompts {name}: the file has no prompts; write one prompt a line")
    return prompts


def objective(cfg, pipe, traj, advantages, rows, steps, rng):
    """The loss of samples `rows` at their timestep indices `steps`, and DDPO's diagnostics."""
    embeds = traj["prompt_embeds"][rows]
    if cfg.algo.startswith("rwr"):  # the ordinary denoising loss on the sample x_0, fresh noise, any t
        x0 = traj["latents"][rows, -1]
        noise = torch.randn_like(x0)
        t = torch.as_tensor(rng.integers(pipe.scheduler.config.num_train_timesteps, size=len(rows)), device=x0.device)
        eps_pred = pipe.unet(pipe.scheduler.add_noise(x0, noise, t), t, embeds).sample
        return ddpo.rwr_loss(eps_pred, noise, advantages[rows]), {}
    log_prob = policy_log_prob(
        pipe, traj["latents"][rows, steps], traj["latents"][rows, steps + 1], traj["timesteps"][rows, steps],
        embeds, traj["negative_embeds"], cfg.guidance_scale, cfg.eta, reduce="none" if cfg.algo == "pxpo" else "mean",
    )
    old_log_prob = traj["log_probs"][rows, steps]
    if cfg.algo == "pxpo":
        loss = ddpo.pxpo_loss(log_prob, advantages[rows], cfg.adv_clip_max)
        log_prob = log_prob.mean(dim=(1, 2, 3))
    elif cfg.algo == "ddpo-sf":
        loss = ddpo.ddpo_sf_loss(log_prob, advantages[rows], cfg.adv_clip_max)
    else:
        loss = ddpo.ddpo_is_loss(log_prob, old_log_prob, advantages[rows], cfg.clip_range, cfg.adv_clip_max)
    return loss, ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)


def update(cfg, pipe, traj, advantages, optimizer, params, rng, autocast):
    """Minibatch updates on one epoch's samples (section 4.2). Samples are shuffled, and each
    sample visits its own random order of timesteps; gradients accumulate over the steps and the
    microbatches of one minibatch, so each optimiser step sees the mean loss over both."""
    num_samples, num_steps = traj["log_probs"].shape
    device = traj["latents"].device
    train_steps = max(1, int(num_steps * cfg.timestep_fraction))
    microbatches = cfg.samples_per_epoch // (cfg.updates_per_epoch * cfg.batch_size)  # per optimiser step
    order = torch.as_tensor(rng.permutation(num_samples), device=device)
    step_order = torch.as_tensor(rng.random((num_samples, num_steps)).argsort(axis=1)[:, :train_steps], device=device)
    stats = defaultdict(list)
    for i, start in enumerate(tqdm(range(0, num_samples, cfg.batch_size), desc="training", leave=False)):
        rows = order[start : start + cfg.batch_size]
        for j in range(train_steps):
            with autocast:
                loss, diagnostics = objective(cfg, pipe, traj, advantages, rows, step_order[rows, j], rng)
            (loss / (train_steps * microbatches)).backward()
            for key, value in {"loss": loss.item(), **diagnostics}.items():
                stats[key].append(value)
        if (i + 1) % microbatches == 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
    return {key: float(np.mean(values)) for key, values in stats.items()}


def main(argv=None):
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=cfg.mixed_precision != "no")
    try:
        pipe = load_pipeline(cfg.model, device, weight_dtype)
    except OSError as error:
        fail(f"--model {cfg.model}: cannot load it ({type(error).__name__}: not a pipeline folder, nor in the hub cache); "
             f"pass a local folder, or download it first with `hf download {cfg.model}`")
    params = add_trainable(pipe.unet, cfg.lora_rank)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    reward_fn = REWARDS[cfg.reward]
    if cfg.reward == "pixel_color":
        reward_fn = functools.partial(reward_fn, target=[float(v) for v in cfg.target_color.split(",")])
    prompt_set = load_prompts(cfg.prompts)
    tracker = ddpo.PerPromptStatTracker(cfg.buffer_size, cfg.min_count) if cfg.per_prompt_stat_tracking else None
    toy_prompts = set(prompt_set) <= set(toy_world.PROMPTS)  # then the toy world's judge reports fidelity

    out = Path(cfg.out)
    write_config(out, dataclasses.asdict(cfg))
    print(f"{cfg.algo} on {cfg.model} ({cfg.device}), reward {cfg.reward}, {len(prompt_set)} prompts -> {out}")
    history = []
    for epoch in range(cfg.epochs):
        # 1. sample: roll out the current policy, one trajectory per drawn prompt
        start = time.time()
        prompts = [prompt_set[i] for i in rng.integers(len(prompt_set), size=cfg.samples_per_epoch)]
        with autocast:
            traj = sample_trajectories(pipe, prompts, cfg.num_steps, cfg.guidance_scale, cfg.eta, cfg.batch_size, generator, progress=True)
        sample_seconds = time.time() - start
        # 2. reward r(x_0, c) on the decoded images (a map (B, H, W) for a pixel-wise reward)
        reward_out = reward_fn(traj["images"], prompts).float().to(device)
        rewards = scalar(reward_out)
        # 3. advantages (RWR: weights)
        advantages = ddpo.advantages(cfg.algo, prompts, reward_out, traj["latents"].shape[-2:], tracker, cfg.beta)
        # 4. update the policy on these samples
        start = time.time()
        stats = update(cfg, pipe, traj, advantages, optimizer, params, rng, autocast)
        train_seconds = time.time() - start
        # 5. log
        metrics = {
            "epoch": epoch, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
            "reward_queries": (epoch + 1) * cfg.samples_per_epoch, **stats,
            **({"fidelity": toy_world.judge(traj["images"], prompts).mean().item()} if toy_prompts else {}),
            "sample_seconds": sample_seconds, "train_seconds": train_seconds,
        }
        history.append(metrics)
        log_epoch(out, history, traj["images"], [f"{p[:20]}\n{r:.2f}" for p, r in zip(prompts, rewards.tolist())], cfg.reward)
        save_weights(pipe, out, cfg.lora_rank)
        fidelity = f" fidelity {metrics['fidelity']:.3f}" if toy_prompts else ""
        ppo = f" kl {stats['approx_kl']:.2e} clipfrac {stats['clipfrac']:.3f}" if "approx_kl" in stats else ""
        print(
            f"epoch {epoch}: reward {metrics['reward_mean']:.3f} ± {metrics['reward_std']:.3f}{fidelity} | loss {stats['loss']:.4g}{ppo} "
            f"| sample {sample_seconds:.1f}s train {train_seconds:.1f}s"
        )
    return history


if __name__ == "__main__":
    main()

"""Beyond the paper: three changes that DDPO's successors made, on SD 1.x's DDIM, each its own flag.

- Groups (--samples-per-prompt k). The paper draws a prompt for every sample (c ~ p(c)) and
  normalises each reward by its prompt's recent rewards (appendix D.3, "Reward Normalization";
  ddpo.PerPromptStatTracker). Flow-GRPO (arXiv 2505.05470) and DanceGRPO (arXiv 2505.07818) draw
  fewer prompts and sample k trajectories of each in the same epoch, a group, and normalise each
  reward within its group (--advantages group, GRPO's advantage): A = (r - mean_g) / (std_g + 1e-6).
  DanceGRPO also starts a group's k trajectories from one x_T (--shared-noise), so that they
  differ only through the steps' noise.
- A window of stochastic, trained steps (--train-window W; MixGRPO, arXiv 2507.21802). Only W
  consecutive steps, drawn anew each epoch, are DDIM steps with eta > 0; the others are
  deterministic DDIM steps (eta = 0, diffusers' own step), which have no log-prob and are never
  trained. Training costs W steps a sample instead of every one (times --timestep-fraction).
- Fewer steps for training than for the evaluation (--eval-num-steps; Flow-GRPO samples 10 steps
  to train and 40 to evaluate): evaluation.py reads it.
"""

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

import ddpo


def draw_groups(prompt_set, rng, n, k):
    """n // k prompts, each k times in a row (a group): drawn without repeats while the set has
    prompts enough, then from a new random order of the set."""
    orders = [rng.permutation(len(prompt_set)) for _ in range(-(-(n // k) // len(prompt_set)))]
    return [prompt_set[i] for i in np.concatenate(orders)[: n // k] for _ in range(k)]


def train_window(cfg, rng, num_steps):
    """Which of the num_steps steps are stochastic and trained: all (None) without --train-window,
    else cfg.train_window consecutive ones from a start drawn uniformly this epoch."""
    if not cfg.train_window:
        return None
    start = int(rng.integers(num_steps - cfg.train_window + 1))
    return torch.arange(num_steps).ge(start) & torch.arange(num_steps).lt(start + cfg.train_window)


def group_noise(pipe, num_samples, k, generator):
    """--shared-noise: one x_T ~ N(0, I) for each group of k samples, repeated k times."""
    unet = pipe.unet.config
    noise = randn_tensor(
        (num_samples // k, unet.in_channels, unet.sample_size, unet.sample_size),
        generator=generator,
        device=pipe.unet.device,
    )
    return noise.repeat_interleave(k, dim=0) * pipe.scheduler.init_noise_sigma


def sampling_options(cfg, pipe, rng, generator, num_samples, num_steps):
    """What sample_trajectories takes beyond the paper's sampling: the window's steps and the
    shared x_T."""
    options = {"stochastic": train_window(cfg, rng, num_steps)}
    if cfg.shared_noise:
        options["initial_latents"] = group_noise(
            pipe, num_samples, cfg.samples_per_prompt, generator
        )
    return options


def flat_groups(scores, k):
    """For each group of k consecutive scores, whether it has no spread: all its rewards equal."""
    return np.ptp(scores.reshape(-1, k), axis=1) == 0


def group_advantages(algo, rewards, k, latent_size, per_position=False):
    """--advantages group: each sample's reward normalised by the mean and std of its group
    (consecutive blocks of k samples; ddpo.batch_advantages within each group, PXPO's maps too). A
    group whose k rewards are all equal gets zero advantages: nothing in it tells better from
    worse."""
    scores, maps = ddpo.reward_maps(algo, rewards, latent_size)
    values = np.zeros_like(scores if maps is None else maps)
    for g, flat in zip(range(0, len(scores), k), flat_groups(scores, k)):
        if not flat:
            values[g : g + k] = ddpo.batch_advantages(
                scores[g : g + k], None if maps is None else maps[g : g + k], per_position
            )
    return torch.as_tensor(values, dtype=torch.float32, device=rewards.device)


def group_stats(cfg, rewards):
    """What an epoch logs of its groups under --advantages group: how many had no spread
    (flat_groups)."""
    if cfg.advantages != "group":
        return {}
    flat = flat_groups(rewards.cpu().numpy(), cfg.samples_per_prompt)
    return {"flat_groups": int(flat.sum())}

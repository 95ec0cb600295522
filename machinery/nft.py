"""After DDPO's likelihood (beyond the paper): DiffusionNFT, negative-aware fine-tuning (Zheng
et al. 2025, arXiv 2509.16117), as its code runs it: NVlabs/DiffusionNFT, scripts/train_nft_sd3.py
(lines below are that file's) and config/nft.py. --algo nft. The paper's section and equation
numbers were not checked here; the formulas are the code's.

No log-prob and no trajectory: the samples x_0 of a sampling policy v_old are noised afresh by the
forward process at one of the schedule's t, and the trained model v_theta is read as a step of
size beta either way of v_old (lines 934-937):

    positive  v+ = (1 - beta) v_old + beta v_theta,   negative  v- = (1 + beta) v_old - beta v_theta

Each sample's advantage A becomes an optimality probability r = (clip(A) / adv_clip_max) / 2 + 1/2
in [0, 1] (line 928), and the loss is flow matching on the sample for both implicit policies, the
positive one pulled to good samples, the negative one to bad ones, on the clean samples the two
predictions imply, x0 = x_t - t v, each squared error divided by its own mean absolute error,
detached (the code's "adaptive weighting", lines 939-960):

    L = adv_clip_max / beta * mean[ r ||x0+ - x_0||^2 / w+ + (1 - r) ||x0- - x_0||^2 / w- ].

At v_theta = v_old its gradient is that of the advantage-weighted regression
clip(A) ||x0_theta - x_0||^2 / w (tests/test_nft.py): RWR's and AWM's pretraining loss weighted by
the advantage, with no ratio to clip.

The sampling policy v_old is a copy of the trained weights that follows them after each epoch's
update by an EMA whose decay rises with the optimiser steps (OldPolicy; return_decay, lines
169-189, applied at 1034-1039). As the code samples (config/nft.py): deterministically (the ODE:
DDIM with eta 0, the flow's Euler step, where the code uses its second-order "dpm2" solver) and
without guidance (w 1: one forward a step, not two); it trains the conditional prediction. The
code's squared distance to the base model's prediction (lines 966-970, weight train.beta, 1e-4
in its configs) is --kl-coef here, 0 by default (docs/algorithms.md: the other differences).
Models that predict the noise or v are trained on the same x0
(clean_prediction): each x0 is affine in its prediction with weights summing to one, so mixing
predictions is mixing their x0. Not ported: the code's second EMA of the trained weights (decay
0.9, train.ema) that it evaluates and saves; here the trained weights are the ones evaluated and
saved.
"""

import contextlib
from collections import defaultdict

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sampler import guided_prediction

# DiffusionNFT's return_decay (scripts/train_nft_sd3.py): the sampling policy's EMA decay after
# optimiser step s is min(rate * (s - flat), ceiling), 0 before `flat` steps; (flat, rate, ceiling)
# of its decay types 0 (v_old = v_theta each epoch), 1 (the default) and 2 (its OCR setting)
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def decay(step, decay_type):
    """The sampling policy's EMA decay after `step` optimiser steps."""
    flat, rate, ceiling = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min(rate * (step - flat), ceiling)


def optimality(advantages, adv_clip_max):
    """r in [0, 1]: the advantage clipped to +-adv_clip_max, mapped linearly (A = 0: r = 1/2)."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(x0_theta, x0_old, x0, r, beta, adv_clip_max):
    """DiffusionNFT's loss (module docstring) from the clean samples implied by the trained and the
    sampling policy's predictions (x0_old without gradient), the samples x0 and their r."""
    dims = tuple(range(1, x0.ndim))

    def adaptive(x0_hat):  # ||x0_hat - x0||^2 / its own mean |x0_hat - x0|, detached
        with torch.no_grad():
            w = (x0_hat.double() - x0.double()).abs().mean(dims, keepdim=True).clamp(min=1e-5)
        return ((x0_hat - x0) ** 2 / w).mean(dims)

    positive = beta * x0_theta + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_theta
    loss = r * adaptive(positive) / beta + (1 - r) * adaptive(negative) / beta
    return (loss * adv_clip_max).mean()


def clean_prediction(scheduler, x_t, t, prediction):
    """x0 implied by the model's prediction at x_t: a flow's velocity v, x_t - t v (t = timestep /
    1000, the code's); a DDPM-schedule model's noise or v by its alpha-bar (sampler.ddim_mean_std's
    x0_hat). Affine in the prediction."""
    shape = (-1, *[1] * (x_t.ndim - 1))
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        s = (t.float() / scheduler.config.num_train_timesteps).view(shape)
        return x_t - s * prediction
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].view(shape)
    if scheduler.config.prediction_type == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * prediction
    return (x_t - (1 - abar).sqrt() * prediction) / abar.sqrt()


class OldPolicy:
    """The sampling policy's weights: a copy of the trainable ones, which sampling and v_old swap in
    (weights()); after each epoch's update they follow the trained ones by an EMA of decay(steps)
    (follow). Its state goes into the checkpoint."""

    def __init__(self, params, decay_type):
        self.params, self.decay_type, self.steps = params, decay_type, 0
        self.old = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def weights(self):
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, old in zip(self.params, self.old):
                p.copy_(old)
        torch.clear_autocast_cache()  # autocast keeps a low-precision copy of each weight by tensor
        try:
            yield
        finally:
            with torch.no_grad():
                for p, theta in zip(self.params, trained):
                    p.copy_(theta)
            torch.clear_autocast_cache()  # else the trained forward would reuse the old weights'

    def follow(self, steps):
        """After `steps` more optimiser steps: old <- d old + (1 - d) theta, d = decay(every
        step so far)."""
        self.steps += steps
        d = decay(self.steps, self.decay_type)
        for old, p in zip(self.old, self.params):
            old.mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self):
        return {"steps": self.steps, "old": self.old}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        for old, saved in zip(self.old, state["old"]):
            old.copy_(saved)


def old_policy(cfg, params):
    """The run's OldPolicy under --algo nft (machinery/run.py holds it), else None."""
    return OldPolicy(params, cfg.nft_decay) if cfg.algo == "nft" else None


def sampling_options(num_steps):
    """NFT samples as its code: every step deterministic (sampler.sample_trajectories)."""
    return {"stochastic": torch.zeros(num_steps, dtype=torch.bool)}


def predictions(cfg, run, x_t, t, c, empty):
    """The trained policy's prediction (with gradient), the sampling policy's and, with --kl-coef,
    the base model's (without): the conditional ones (a guidance-distilled model's with its w)."""
    predict = run.policy.predict
    w = cfg.guidance_scale if getattr(predict, "guidance_input", False) else 1.0
    state = (x_t, t, c, empty, w, predict)
    with torch.no_grad():  # first: its weights are swapped in and out in place
        with run.old_policy.weights():
            old = guided_prediction(run.pipe.unet, *state)
        base = None
        if cfg.kl_coef > 0:
            with run.base() as base_unet:
                base = guided_prediction(base_unet, *state)
    return guided_prediction(run.pipe.unet, *state), old, base


def nft_update(cfg, run, traj, advantages):
    """NFT's update on this process's samples: the minibatches and steps train.update draws, each
    state noised afresh from its clean sample; the gradients accumulate into cfg.updates_per_epoch
    optimiser steps a pass. Then the sampling policy follows the trained weights."""
    from machinery.matching import plan
    from train import denoising, epoch_means, fused_steps, optimizer_step

    batches, train_steps, microbatches = plan(cfg, run, traj)
    stats, skipped = defaultdict(list), 0
    for i, (samples, step_order) in enumerate(batches):
        for rows, k, each in fused_steps(samples, step_order, train_steps, cfg.steps_per_forward):
            with run.autocast:
                x0, t = traj["latents"][rows, -1], traj["timesteps"][rows, k]
                x_t, _ = denoising(run.pipe.scheduler, x0, torch.randn_like(x0), t)
                c, empty = traj["prompt_embeds"][rows], traj["negative_embeds"]
                theta, old, base = predictions(cfg, run, x_t, t, c, empty)
                clean = (clean_prediction(run.pipe.scheduler, x_t, t, v) for v in (theta, old))
                x0_theta, x0_old = clean
                r = optimality(advantages[rows], cfg.adv_clip_max)
                loss = nft_loss(x0_theta, x0_old, x0, r, cfg.beta, cfg.adv_clip_max)
                deviation = ((theta.detach() - old) ** 2).mean()  # the code's old_deviate
                if base is not None:  # the code's KL term: the squared distance to the base's
                    loss = loss + cfg.kl_coef * ((theta - base) ** 2).mean()
            (loss * each / (train_steps * microbatches)).backward()
            for key, value in {"loss": loss.detach(), "old_deviation": deviation}.items():
                stats[key].append((value, each))
        if (i + 1) % microbatches == 0:
            skipped += not optimizer_step(cfg, run)
    run.old_policy.follow(len(batches) // microbatches)  # the code's global_step counts them all
    return {**epoch_means(stats), "skipped_updates": skipped}

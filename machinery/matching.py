"""After DDPO's likelihood (beyond the paper): Advantage Weighted Matching, AWM (Xue et al. 2025,
arXiv 2509.25050; its code: scxue/advantage_weighted_matching, scripts/train_sd3_awm.py,
compute_log_prob_awm and the loss after it). --algo awm.

DDPO_IS scores the sampled action x_{t-1} under the step's Gaussian. AWM shows that this policy
gradient is a denoising score-matching loss whose target is noisy (the sampled x_{t-1}), and swaps
it for the model's own pretraining loss on the clean sample: at one of the sampling schedule's t,
with fresh noise, x_t is the forward process of x_0 (the scheduler's add_noise: (1 - t) x_0 + t
noise for a flow), and the "log-prob" is

    log p_AWM(x_0 | c) = - mean over the latent's elements of (prediction(x_t, t, c) - target)^2,

the target the one the model was trained on (the velocity noise - x_0 for a flow, the noise eps, or
v). Its ratio exp(log p_AWM - log p_AWM_old) is clipped as DDPO_IS's (ddpo.policy_loss, whose
"awm" is ddpo.ddpo_is_loss): RWR's regression (ddpo.rwr_loss) weighted as DDPO_IS weights, by the
advantage, in place of exp(beta r).

As the code's base configuration (config/base_awm.py): uniform weighting over t, no KL (beta 0),
no EMA, so the old log-prob is the current weights' before the epoch's first update (ratio 1 at
the first step); the conditional prediction (train.cfg False; a guidance-distilled model gets its
w); DDPO_IS's clip range and advantage clip. Not as the code: the code's discrete time types draw
one index in each stratum of the schedule and share those t across a minibatch; here each sample
trains on its own random --timestep-fraction of the schedule's steps, as DDPO_IS does.
"""

from collections import defaultdict

import torch

import ddpo
from machinery import nft
from sampler import guided_prediction


def matching_log_prob(prediction, target):
    """AWM's log-prob: minus the mean squared error over each sample's elements (uniform over t)."""
    return -((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def noised(pipe, x0, t, seeds):
    """x_t of the clean samples x0 at timesteps t and the target (train.denoising), each with its
    own noise drawn from its seed (the same noise when the old log-prob is computed and when the
    step trains)."""
    from train import denoising

    noise = torch.stack(
        [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(x0.device, x0.dtype)
    return denoising(pipe.scheduler, x0, noise, t)


def log_probs(cfg, run, traj, rows, k, seeds):
    """log p_AWM of the samples `rows` at their steps k, with the current weights."""
    x0, t = traj["latents"][rows, -1], traj["timesteps"][rows, k]
    x_t, target = noised(run.pipe, x0, t, seeds)
    c, empty, predict = traj["prompt_embeds"][rows], traj["negative_embeds"], run.policy.predict
    # the conditional prediction; a guidance-distilled model's with its own w (its input)
    w = cfg.guidance_scale if getattr(predict, "guidance_input", False) else 1.0
    prediction = guided_prediction(run.pipe.unet, x_t, t, c, empty, w, predict)
    return matching_log_prob(prediction, target)


def plan(cfg, run, traj):
    """The minibatches and steps train.update draws (train.shuffled_microbatches), over every step
    of the schedule, for an update that trains on fresh noise (AWM's, NFT's): the batches, each
    sample's trained steps, and the microbatches an optimiser step takes."""
    from train import shuffled_microbatches

    num_samples, device = len(traj["latents"]), traj["latents"].device
    steps = torch.arange(traj["timesteps"].shape[1], device=device)
    train_steps = max(1, int(len(steps) * cfg.timestep_fraction))
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)
    batches = shuffled_microbatches(cfg, num_samples, run.rng, device, steps, train_steps)
    return batches, train_steps, microbatches


def awm_update(cfg, run, traj, advantages):
    """AWM's update on this process's samples: the minibatches and steps train.update draws, each
    state's noise seeded once; the old log-probs of every state first, without gradient, then the
    clipped-ratio loss of each minibatch, its gradients accumulated into cfg.updates_per_epoch
    optimiser steps a pass."""
    from train import epoch_means, fused_steps, optimizer_step

    batches, train_steps, microbatches = plan(cfg, run, traj)
    forwards = [
        (rows, k, each, run.rng.integers(2**62, size=len(rows)))
        for samples, step_order in batches
        for rows, k, each in fused_steps(samples, step_order, train_steps, cfg.steps_per_forward)
    ]
    with torch.no_grad(), run.autocast:  # the old policy: the weights that sampled the epoch
        old = [log_probs(cfg, run, traj, rows, k, seeds) for rows, k, _, seeds in forwards]
    stats, skipped, per_batch = defaultdict(list), 0, len(forwards) // len(batches)
    for n, ((rows, k, each, seeds), old_log_prob) in enumerate(zip(forwards, old)):
        with run.autocast:
            log_prob = log_probs(cfg, run, traj, rows, k, seeds)
            A = advantages[rows]
            clips = (cfg.clip_range, cfg.adv_clip_max)
            loss = ddpo.policy_loss(cfg.algo, log_prob, None, old_log_prob, A, *clips)
            diagnostics = ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)
        (loss * each / (train_steps * microbatches)).backward()
        for key, value in {"loss": loss.detach(), **diagnostics}.items():
            stats[key].append((value, each))
        if (n + 1) % (per_batch * microbatches) == 0:
            skipped += not optimizer_step(cfg, run)
    return {**epoch_means(stats), "skipped_updates": skipped}


# the algorithms whose update is not train.update's
UPDATES = {"awm": awm_update, "nft": nft.nft_update}

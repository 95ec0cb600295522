"""Fine-tune a Stable Diffusion (1.x, 2.x, XL; 3 by machinery/flow.py) denoiser with DDPO (Black et
al. 2023). One epoch is: sample trajectories -> reward -> advantages -> minibatch updates -> log
(and checkpoint).

    python train.py --reward jpeg                       # SD v1.4 with CUDA, else the bundled model
    python train.py --algo rwr                          # or ddpo-sf, rwr-sparse, pxpo
    python train.py --resume runs/<run>                 # after a crash or Ctrl-C, where it stopped
    torchrun --nproc-per-node 8 train.py --reward jpeg  # data parallel over 8 GPUs

Defaults are the paper's SD v1.4 settings with a LoRA; with the bundled model the preset "tiny"
scales them to a CPU (`--show-config` says where each setting comes from). The policy and its
log-prob are in sampler.py, advantages and losses in ddpo.py, rewards in rewards.py. All that is
not the paper (settings, the run folder, resume, processes, the extensions) is in machinery/.
"""

from machinery import cli

if __name__ == "__main__":  # --help and a bad flag answer here, before torch and diffusers load
    cli_config = cli.parse_args(description=__doc__)

import os
from collections import defaultdict

import torch
from tqdm import tqdm

# before they are imported: keep the console for results
for library in ("TRANSFORMERS", "DIFFUSERS"):
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

import ddpo
from ddpo import scalar
from machinery.config import Config
from machinery.run import Run, epoch_means
from sampler import ddim_step_with_logprob, guided_eps, reduce_elements, sample_trajectories


def main(argv=None, reward_fn=None):
    """One training run: argv are train.py's flags (or their Config); returns the history.
    reward_fn, your own reward function (docs/rewards.md, "Your own reward"), is recorded in
    config.json by its qualified name, and must be given again to resume the run."""
    cfg = argv if isinstance(argv, Config) else cli.parse_args(argv, description=__doc__)
    # machinery/run.py: the processes, the model, the folder, resume; after the last epoch, the
    # final weights' evaluation (beyond the paper)
    with Run(cfg, reward_fn) as run:
        cfg = run.cfg
        for epoch in run.epochs():
            run.before_sampling(epoch)  # beyond the paper: the fixed-noise evaluation, when due
            # 1. sample: roll out the current policy, one trajectory per drawn prompt
            prompts = run.draw_prompts()
            with run.autocast:
                traj = sample_trajectories(
                    run.pipe,
                    prompts,
                    cfg.num_steps,
                    cfg.guidance_scale,
                    cfg.eta,
                    cfg.batch_size,
                    run.generator,
                    **run.sampling_options(epoch, prompts),
                )
            # 2. reward r(x_0, c) of the decoded images, gathered from every process
            all_prompts, reward_out = run.reward(epoch, traj["images"], prompts)
            rewards = scalar(reward_out)  # a pixel-wise reward's map: its mean
            if cfg.algo.startswith("rwr"):  # the paper's RWR baseline, instead of phases 3 and 4
                stats = rwr_round(cfg, run, traj, all_prompts, rewards)
            else:
                # 3. advantages: each reward against its prompt's statistics, over the whole epoch
                advantages = run.advantages(all_prompts, reward_out, traj["latents"].shape[-2:])
                # 4. update the policy on this process's samples
                stats = update(cfg, run, traj, advantages)
            # 5. log: metrics, samples and weights, a checkpoint when due
            run.log(epoch, traj, prompts, rewards, stats)
    return run.history


def update(cfg, run, traj, advantages):
    """DDPO's update (section 4.3; appendix D.1): the epoch's samples, shuffled into
    cfg.updates_per_epoch minibatches, in cfg.inner_epochs passes. Each sample trains on its own
    random cfg.timestep_fraction of its steps; the gradients of a minibatch's samples and steps
    accumulate into one optimiser step on their mean loss."""
    num_samples = len(traj["log_probs"])
    device = traj["latents"].device
    steps = traj["stochastic"].nonzero()[:, 0].to(device)  # every step (beyond the paper: a window)
    train_steps = max(1, int(len(steps) * cfg.timestep_fraction))
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)  # per optimiser step
    stats, skipped = defaultdict(list), 0
    batches = shuffled_microbatches(cfg, num_samples, run.rng, device, steps, train_steps)
    progress = tqdm(batches, desc="training", disable=None if run.progress else True, leave=False)
    for i, (samples, step_order) in enumerate(progress):
        # each sample's trained steps, a step t of every sample a forward (beyond the paper: K)
        for chunk, (rows, k, each) in enumerate(run.fused_steps(samples, step_order, train_steps)):
            with run.autocast:
                # the stored states s_t = (c, t, x_t), in the UNet's order, and the prediction now
                x_t, t = traj["latents"][rows, k], traj["timesteps"][rows, k]
                c = traj["prompt_embeds"][rows]
                eps = guided_eps(
                    run.pipe.unet, x_t, t, c, traj["negative_embeds"], cfg.guidance_scale
                )
                # the action a_t = x_{t-1}: its log-density now, by the function that sampled it
                action = traj["latents"][rows, k + 1]
                _, element_log_prob = ddim_step_with_logprob(
                    run.pipe.scheduler, eps, t, x_t, cfg.eta, action, reduce="none"
                )
                # averaged over the latent's elements:
                # README, "Why is the log-prob averaged, not summed?"
                log_prob = reduce_elements(element_log_prob, "mean")
                old_log_prob = traj["log_probs"][rows, k]  # at sampling time
                A = advantages[rows]
                if cfg.algo == "ddpo-is":  # importance sampling: ratio p_theta / p_old, clipped
                    loss = ddpo.ddpo_is_loss(
                        log_prob, old_log_prob, A, cfg.clip_range, cfg.adv_clip_max
                    )
                elif cfg.algo == "ddpo-sf":  # the score function (REINFORCE), on-policy
                    loss = ddpo.ddpo_sf_loss(log_prob, A, cfg.adv_clip_max)
                else:  # pxpo: every latent position its own advantage
                    loss = ddpo.pxpo_loss(element_log_prob, A, cfg.adv_clip_max)
                diagnostics = ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)
                penalty, measured = run.extra_loss(traj, (x_t, t, c), eps, chunk == 0, len(samples))
                loss = loss + penalty  # beyond the paper: the KL leash (0 without --kl-coef)
                diagnostics.update(measured)
            # loss is a mean over these states: weighted by their share of the optimiser step
            (loss * each / (train_steps * microbatches)).backward()
            for key, value in {"loss": loss.detach(), **diagnostics}.items():
                stats[key].append((value, each))
        if (i + 1) % microbatches == 0:
            skipped += not run.optimizer_step()
    return {**epoch_means(stats), "skipped_updates": skipped}


def shuffled_microbatches(cfg, num_samples, rng, device, steps=None, train_steps=1):
    """cfg.inner_epochs passes over the samples, each in a new random order, cut into microbatches
    of cfg.batch_size rows. Given the steps a sample can train (their indices), each pass also
    draws every sample's own random order of them, of which the first train_steps are trained."""
    batches = []
    for _ in range(cfg.inner_epochs):
        order = torch.as_tensor(rng.permutation(num_samples), device=device)
        step_order = None
        if steps is not None:
            drawn = rng.random((num_samples, len(steps))).argsort(axis=1)[:, :train_steps]
            step_order = steps[torch.as_tensor(drawn, device=device)]
        starts = range(0, num_samples, cfg.batch_size)
        batches += [(order[start : start + cfg.batch_size], step_order) for start in starts]
    return batches


def rwr_round(cfg, run, traj, prompts, rewards):
    """Reward-weighted regression, the paper's baseline (section 4.2; appendix D.2): weights from
    the epoch's scalar rewards (ddpo.rwr_epoch_weights; this process keeps its own rows), then the
    weighted denoising loss of the guided prediction on the samples x_0, each at one fresh noise
    level per pass, in cfg.inner_epochs passes (ddpo.rwr_loss)."""
    per_prompt = cfg.per_prompt_stat_tracking
    weights = ddpo.rwr_epoch_weights(cfg.algo, prompts, rewards, cfg.beta, per_prompt=per_prompt)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=rewards.device)
    selectivity = float(ddpo.weight_share(weights.cpu().numpy()))
    weights = weights[run.mine]
    num_samples = len(traj["log_probs"])
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)
    stats, skipped = defaultdict(list), 0
    batches = shuffled_microbatches(cfg, num_samples, run.rng, traj["latents"].device)
    progress = tqdm(batches, desc="training", disable=None if run.progress else True, leave=False)
    for i, (rows, _) in enumerate(progress):
        with run.autocast:
            loss = rwr_regression_loss(cfg, run.pipe, traj, weights, rows, run.rng)
        (loss / microbatches).backward()
        stats["loss"].append((loss.detach(), 1))
        if (i + 1) % microbatches == 0:
            skipped += not run.optimizer_step()
    return {**epoch_means(stats), "skipped_updates": skipped, "weight_share": selectivity}


def rwr_regression_loss(cfg, pipe, traj, weights, rows, rng):
    """RWR's loss on the samples `rows`: the denoising loss of the guided prediction on each x_0,
    noised afresh at a random t, times the sample's weight (ddpo.rwr_loss). The target is what the
    model predicts, the one it was trained on: the noise, or for v-prediction (SD 2.x at 768 px)
    the velocity v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (a flow model's, machinery/flow.py:
    noise - x_0)."""
    x0 = traj["latents"][rows, -1]
    noise = torch.randn_like(x0)
    size = len(rows)
    t = torch.as_tensor(
        rng.integers(pipe.scheduler.config.num_train_timesteps, size=size), device=x0.device
    )
    x_t, c = pipe.scheduler.add_noise(x0, noise, t), traj["prompt_embeds"][rows]
    prediction = guided_eps(pipe.unet, x_t, t, c, traj["negative_embeds"], cfg.guidance_scale)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        target = pipe.scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    return ddpo.rwr_loss(prediction, target, weights[rows])


if __name__ == "__main__":
    main(cli_config)

"""Fine-tune a Stable Diffusion denoiser with DDPO (Black et al. 2023; other model families by
machinery/families/). One epoch is: sample trajectories -> reward -> advantages -> minibatch
updates -> log (and checkpoint).

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

import contextlib
import dataclasses
import os
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

# before they are imported: keep the console for results
for library in ("TRANSFORMERS", "DIFFUSERS"):
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

import ddpo
from ddpo import scalar
from machinery import matching, parallel, successors
from machinery.config import Config
from machinery.leash import kl_penalty
from machinery.run import Run
from sampler import SD1, guided_prediction, reduce_elements, sample_trajectories, step_with_logprob


def main(argv=None, reward_fn=None):
    """One training run: argv are train.py's flags (or their Config); returns the history.
    reward_fn, your own reward function (docs/rewards.md, "Your own reward"), is recorded in
    config.json by its qualified name, and must be given again to resume the run."""
    cfg = argv if isinstance(argv, Config) else cli.parse_args(argv, description=__doc__)
    # machinery/run.py: processes, model, folder, resume; the final evaluation (beyond the paper)
    with Run(cfg, reward_fn, adamw) as run:
        cfg = run.cfg
        for epoch in run.epochs():
            run.before_sampling(epoch)  # beyond the paper: the fixed-noise evaluation, when due
            # 1. sample: c ~ p(c), then roll out the current policy, one trajectory a prompt
            prompts = draw_prompts(run.prompt_set, run.rng, run.share, cfg.samples_per_prompt)
            w, eta, batch_size = cfg.guidance_scale, cfg.eta, cfg.sample_batch_size
            settings = (cfg.num_steps, w, eta, batch_size, run.generator)
            with run.autocast, run.sampling_weights():  # beyond the paper: machinery/run.py
                options = run.sampling_options(epoch, prompts)
                traj = sample_trajectories(run.pipe, prompts, *settings, run.policy, **options)
            # 2. reward r(x_0, c) of the decoded images
            scores = run.reward_fn(traj["images"], prompts)
            # beyond the paper: every process's rewards gathered, checked finite (machinery/run.py)
            all_prompts, reward_out = run.gather_rewards(epoch, scores, prompts)
            rewards = scalar(reward_out)  # a pixel-wise reward's map: its mean
            if cfg.algo.startswith("rwr"):  # the paper's RWR baseline, instead of phases 3 and 4
                stats = rwr_round(cfg, run, traj, all_prompts, rewards)
            else:
                # 3. advantages: each reward against its prompt's statistics, over the whole epoch
                size = traj["latents"].shape[-2:]  # the latent's, for PXPO's maps
                advantages = epoch_advantages(cfg, run.tracker, all_prompts, reward_out, size)
                # 4. update the policy on this process's samples (beyond the paper: AWM's, matching)
                stats = matching.UPDATES.get(cfg.algo, update)(cfg, run, traj, advantages[run.mine])
            # 5. log: metrics, samples and weights, a checkpoint when due
            run.log(epoch, traj, prompts, rewards, stats)
    return run.history


@dataclasses.dataclass
class Learner:
    """What update and rwr_round use of a run (machinery's Run has the same names): the policy, its
    weights, optimiser and random stream; autocast, the leash's base, a bar, this process's rows."""

    pipe: object
    params: list
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    policy: object = SD1
    autocast: object = dataclasses.field(default_factory=contextlib.nullcontext)
    base: object = None
    progress: bool = False
    mine: slice = dataclasses.field(default_factory=lambda: slice(None))


def adamw(cfg, params):
    """The optimiser: AdamW (appendix D.5), at --lr, with --weight-decay."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8
    )


def draw_prompts(prompt_set, rng, n, samples_per_prompt=1):
    """c ~ p(c), uniform over the prompt set: one prompt a trajectory, n of them (this process's
    share of the epoch). Beyond the paper: groups of one prompt (machinery/successors.py)."""
    if samples_per_prompt > 1:
        return successors.draw_groups(prompt_set, rng, n, samples_per_prompt)
    return [prompt_set[i] for i in rng.integers(len(prompt_set), size=n)]


def epoch_advantages(cfg, tracker, prompts, rewards, latent_size):
    """Every sample's advantage: its reward against its prompt's statistics (tracker; appendix
    D.3), or the batch's with --no-per-prompt-stat-tracking (ddpo.advantages); beyond the paper,
    within each group of --samples-per-prompt (--advantages group, machinery/successors.py)."""
    per_position, k = cfg.pxpo_normalise == "position", cfg.samples_per_prompt
    if cfg.advantages == "group":
        return successors.group_advantages(cfg.algo, rewards, k, latent_size, per_position)
    return ddpo.advantages(cfg.algo, prompts, rewards, latent_size, tracker, per_position)


def fused_steps(samples, step_order, train_steps, steps_per_forward=1):
    """Which (sample, step) pairs each forward trains: each sample's first train_steps steps of its
    own random order (step_order), steps_per_forward of each sample's at a time (beyond the paper,
    speed only: --steps-per-forward K). Yields the rows and steps of each forward's states (each
    sample's row repeated once a step), step-major, and how many steps of each sample they are."""
    for chunk in torch.arange(train_steps, device=samples.device).split(steps_per_forward):
        yield samples.repeat(len(chunk)), step_order[samples][:, chunk].T.flatten(), len(chunk)


def optimizer_step(cfg, learner):
    """One step on the accumulated gradient, clipped to --max-grad-norm (appendix D.5); skipped
    (False) when it is not finite, so the weights stay finite (the epoch's skipped_updates count
    it, and its console line says so)."""
    parallel.average_gradients(learner.params)  # beyond the paper: over torchrun's processes
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.params, cfg.max_grad_norm)
    finite = bool(torch.isfinite(grad_norm))  # a non-finite loss gives a non-finite norm too
    if finite:
        learner.optimizer.step()
    learner.optimizer.zero_grad()
    return finite


def update(cfg, run, traj, advantages):
    """DDPO's update (section 4.3; appendix D.1): the epoch's samples, shuffled into
    cfg.updates_per_epoch minibatches, in cfg.inner_epochs passes. Each sample trains on its own
    random cfg.timestep_fraction of its steps; the gradients of a minibatch's samples and steps
    accumulate into one optimiser step on their mean loss. run: a machinery Run, or a Learner."""
    num_samples = len(traj["log_probs"])
    device = traj["latents"].device
    steps = traj["stochastic"].nonzero()[:, 0].to(device)  # every step (beyond the paper: a window)
    train_steps = max(1, int(len(steps) * cfg.timestep_fraction))
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)  # per optimiser step
    stats, skipped = defaultdict(list), 0
    batches = shuffled_microbatches(cfg, num_samples, run.rng, device, steps, train_steps)
    progress = tqdm(batches, desc="training", disable=None if run.progress else True, leave=False)
    for i, (samples, step_order) in enumerate(progress):
        # each sample's trained steps, a step of every sample a forward (beyond the paper: several,
        # --steps-per-forward)
        forwards = fused_steps(samples, step_order, train_steps, cfg.steps_per_forward)
        for chunk, (rows, k, each) in enumerate(forwards):
            with run.autocast:
                # the stored states s_t = (c, t, x_t), in the UNet's order, and the prediction now
                x_t, t = traj["latents"][rows, k], traj["timesteps"][rows, k]
                c, empty = traj["prompt_embeds"][rows], traj["negative_embeds"]
                w, predict = cfg.guidance_scale, run.policy.predict
                eps = guided_prediction(run.pipe.unet, x_t, t, c, empty, w, predict)
                # the action a_t = x_{t-1}: its log-density now, by the function that sampled it
                action = traj["latents"][rows, k + 1]
                scheduler, mean_std = run.pipe.scheduler, run.policy.mean_std
                _, element_log_prob = step_with_logprob(
                    scheduler, eps, t, x_t, cfg.eta, action, reduce="none", mean_std=mean_std
                )
                # the mean over its elements (README, "Why is the log-prob averaged, not summed?")
                log_prob = reduce_elements(element_log_prob, "mean")
                old_log_prob = traj["log_probs"][rows, k]  # at sampling time
                # DDPO_IS's clipped ratio, DDPO_SF's score function or PXPO's per-position credit
                A, clips = advantages[rows], (cfg.clip_range, cfg.adv_clip_max)
                log_probs = (log_prob, element_log_prob, old_log_prob)
                loss = ddpo.policy_loss(cfg.algo, *log_probs, A, *clips)
                diagnostics = ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)
                # beyond the paper: the KL leash's term (0 without --kl-coef; with a LoRA the
                # epoch's first forward also measures kl_to_base, one more forward of the base)
                states, first = (x_t, t, c), i == chunk == 0
                penalty, measured = kl_penalty(cfg, run, traj, states, eps, first, len(samples))
                loss = loss + penalty
                diagnostics.update(measured)
            # loss is a mean over these states: weighted by their share of the optimiser step
            (loss * each / (train_steps * microbatches)).backward()
            for key, value in {"loss": loss.detach(), **diagnostics}.items():
                stats[key].append((value, each))
        if (i + 1) % microbatches == 0:
            skipped += not optimizer_step(cfg, run)
    return {**epoch_means(stats), "skipped_updates": skipped}


def epoch_means(stats):
    """The epoch's mean of each logged value, weighted by the steps it covers (read once)."""
    return {
        key: sum(value.double() * n for value, n in pairs).item() / sum(n for _, n in pairs)
        for key, pairs in stats.items()
    }


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
            loss = rwr_regression_loss(cfg, run.pipe, traj, weights, rows, run.rng, run.policy)
        (loss / microbatches).backward()
        stats["loss"].append((loss.detach(), 1))
        if (i + 1) % microbatches == 0:
            skipped += not optimizer_step(cfg, run)
    return {**epoch_means(stats), "skipped_updates": skipped, "weight_share": selectivity}


def rwr_regression_loss(cfg, pipe, traj, weights, rows, rng, policy=SD1):
    """RWR's loss on the samples `rows`: the denoising loss of the guided prediction on each x_0,
    noised afresh at a random t, times the sample's weight (ddpo.rwr_loss), against the target the
    model was trained on (denoising). policy: the model family's (its denoiser's prediction)."""
    x0 = traj["latents"][rows, -1]
    noise = torch.randn_like(x0)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    t = torch.as_tensor(rng.integers(num_train_timesteps, size=len(rows)), device=x0.device)
    (x_t, target), c = denoising(pipe.scheduler, x0, noise, t), traj["prompt_embeds"][rows]
    prediction = guided_prediction(
        pipe.unet, x_t, t, c, traj["negative_embeds"], cfg.guidance_scale, policy.predict
    )
    return ddpo.rwr_loss(prediction, target, weights[rows])


def denoising(scheduler, x0, noise, t):
    """x_t, x0 noised at t, and what the model predicts there, the target it was trained on: the
    noise, or for a v-prediction model v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0, by the
    scheduler's get_velocity (which a model family may define otherwise: a flow's noise - x_0)."""
    v = scheduler.config.prediction_type == "v_prediction"
    return scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t) if v else noise


if __name__ == "__main__":
    main(cli_config)

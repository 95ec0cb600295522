"""Fine-tune a Stable Diffusion (1.x, 2.x or XL) UNet with DDPO (Black et al. 2023). One epoch is:
sample trajectories -> reward -> advantages -> minibatch updates -> log (and checkpoint).

    python train.py --reward jpeg                      # SD v1.4 on CUDA, else the bundled CPU model
    python train.py --model CompVis/stable-diffusion-v1-4 --reward jpeg_incompressibility
    python train.py --algo rwr                         # or ddpo-sf, rwr-sparse, pxpo
    python train.py --resume runs/<run>                # after a crash or Ctrl-C, exactly where it stopped
    torchrun --nproc-per-node 8 train.py --reward jpeg # data parallel over 8 GPUs (parallel.py)

Defaults are the paper's SD v1.4 settings, with a LoRA (`--show-config` says where each comes
from); with the bundled model the preset "tiny" scales them to a CPU (every flag given still wins);
config.py holds them all, and checks.py refuses bad ones. The policy and its log-prob are in
sampler.py, advantages and losses in ddpo.py, rewards in rewards.py, the fixed-noise evaluation in
evaluation.py, the run folder (what it writes, signals, a full disk) in run_folder.py, what resume
needs in checkpoints.py.
"""
from machinery import cli, config

if __name__ == "__main__":  # --help, --show-config and a bad flag answer here, before torch and diffusers load (seconds)
    cli_config = cli.parse_args(description=__doc__)

import dataclasses
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

for library in ("TRANSFORMERS", "DIFFUSERS"):  # before they are imported: keep the console for results
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

from machinery import checkpoints
import ddpo
from machinery import parallel
from machinery import run_folder
from machinery import successors
import toy_world
from machinery import trackers
from machinery.cli import parse_args
from machinery.config import load_prompts, stop
from machinery.evaluation import evaluate, evaluation_due, final_row
from machinery.pipeline import DTYPES, add_trainable, compile_policy, load_model, prompt_losses
from rewards import load_reward, python_reward, scalar
from machinery.run_folder import STOPPED, stop_signals
from sampler import base_policy, ddim_step_with_logprob, guided_eps, policy_kl, reduce_elements, sample_trajectories


def main(argv=None, reward_fn=None):
    """One training run: argv are train.py's flags (or their Config, already parsed); returns the
    history. reward_fn, your own reward function (rewards.py says what it takes and returns), is
    recorded in config.json by its qualified name, and must be given again to resume the run."""
    cfg = argv if isinstance(argv, config.Config) else parse_args(argv, description=__doc__)
    cfg = python_reward(cfg, reward_fn)
    rank, world, device = parallel.setup(cfg.device)  # (0, 1, cfg.device) without torchrun
    resumed = checkpoints.read(cfg, world) if cfg.resume else None
    say = tqdm.write if rank == 0 else lambda *args, **kwargs: None  # a line above the progress bars, which it leaves whole
    seed = cfg.seed + rank * parallel.SEED_STRIDE  # this process's own seed; rank 0's is --seed
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every process
    rng = np.random.default_rng(seed)  # prompts, shuffles, timestep orders
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    weight_dtype = DTYPES[cfg.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=cfg.mixed_precision != "no")
    reward_fn = load_reward(cfg, reward_fn)
    pipe = load_model(cfg, device, weight_dtype)  # pipeline.py: the model of --model, checked for what the run asks of it
    params = add_trainable(pipe.unet, cfg.lora_rank)
    base = base_policy(pipe.unet, cfg.lora_rank) if config.base_needed(cfg) else None  # before any update
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if cfg.compile:
        compile_policy(pipe, base)
    if rank:
        torch.manual_seed(seed)  # after the shared initialisation, this process's own (RWR's noise)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    generator = torch.Generator(device).manual_seed(seed)  # the sampling noise
    prompt_set = load_prompts(cfg.prompts)
    eval_set = load_prompts(cfg.eval_prompts or cfg.prompts, "--eval-prompts")
    for notice in prompt_losses(pipe.tokenizer, {"--prompts": prompt_set, "--eval-prompts": eval_set if cfg.eval_prompts else []}):
        say(f"train.py: warning: {notice}", file=sys.stderr)  # what the text encoder will not see of them
    eval_prompts = [eval_set[k % len(eval_set)] for k in range(cfg.eval_samples)]
    per_position = cfg.pxpo_normalise == "position"
    tracker = ddpo.PerPromptStatTracker(cfg.buffer_size, cfg.min_count, per_position) if cfg.per_prompt_stat_tracking else None
    toy_prompts = set(prompt_set) <= set(toy_world.PROMPTS)  # then the toy world's judge reports fidelity

    out, history = Path(cfg.out), []
    parallel.barrier()  # every process has checked --out before rank 0 writes into it
    first_epoch = resumed["epoch"] + 1 if resumed else 0
    with (run_folder.claim(out, cfg.resume, rank, run_folder.epoch_bytes(params)),  # one train.py a folder
          stop_signals(out) as stop_requested, trackers.tracking(cfg, out, first_epoch, rank) as track):
        if cfg.resume:
            history = checkpoints.restore(resumed, cfg, pipe, optimizer, tracker, rng, generator, rank, device)
            if rank == 0:
                run_folder.update_config(out, reward_sha256=cfg.reward_sha256)  # your reward's file as the run goes on with it
            say(f"resuming {out} after epoch {resumed['epoch']}" if resumed else f"{out} has no checkpoint yet: its run starts again from epoch 0")
        elif rank == 0:
            run_folder.write_config(out, dataclasses.asdict(cfg), prompt_set, eval_set if cfg.eval_prompts else None)
        say(f"{cfg.algo} on {cfg.model} ({device}{f' x {world} processes' if world > 1 else ''}), reward {cfg.reward}, "
            f"{len(prompt_set)} prompts -> {out}")
        session_start = time.time()
        for epoch in tqdm(range(first_epoch, cfg.epochs), desc="epochs", total=cfg.epochs, initial=first_epoch, disable=None if rank == 0 else True):
            # 0. beyond the paper: the fixed-noise evaluation, every eval_every epochs (and after the last)
            due = evaluation_due(cfg, epoch, rank)
            eval_metrics = evaluate(cfg, pipe, base, eval_prompts, set(prompt_set), reward_fn, autocast, out, epoch) if due else {}
            # 1. sample: roll out the current policy, one trajectory per drawn prompt (this process's share)
            start = time.time()
            if cfg.samples_per_prompt == 1:
                prompts = [prompt_set[i] for i in rng.integers(len(prompt_set), size=cfg.samples_per_epoch // world)]
            else:  # beyond the paper: groups of one prompt (successors.py)
                prompts = successors.draw_groups(prompt_set, rng, cfg.samples_per_epoch // world, cfg.samples_per_prompt)
            with autocast:
                traj = sample_trajectories(pipe, prompts, cfg.num_steps, cfg.guidance_scale, cfg.eta, cfg.batch_size, generator,
                                           progress=rank == 0, after_first_batch=functools.partial(after_first_batch, cfg, epoch, start, say, reward_fn),
                                           **successors.sampling_options(cfg, pipe, rng, generator, len(prompts), cfg.num_steps))  # beyond the paper
            if device.type == "cuda":
                torch.cuda.synchronize()  # the GPU's queue is done: an honest sampling time
            sample_seconds = time.time() - start
            # 2. reward r(x_0, c) on the decoded images (a map (B, H, W) for a pixel-wise reward), gathered from every process
            reward_out = parallel.gather(reward_fn(traj["images"], prompts).float().to(device))
            all_prompts = parallel.gather_objects(prompts)
            if not torch.isfinite(reward_out).all():
                stop(f"epoch {epoch}: the reward {cfg.reward} returned non-finite values, so nothing of this epoch was trained on or saved; "
                     f"fix the reward, then continue with --resume {out}")
            rewards = scalar(reward_out)
            mine = slice(rank * len(prompts), (rank + 1) * len(prompts))  # this process's samples among every process's
            start = time.time()
            if cfg.algo.startswith("rwr"):  # the paper's RWR baseline: weighted regression instead of phases 3 and 4
                stats = rwr_round(cfg, pipe, traj, all_prompts, rewards, mine, optimizer, params, rng, autocast, progress=rank == 0)
            else:
                # 3. advantages: each reward normalised by its prompt's statistics, over the whole epoch
                if cfg.advantages == "tracker":
                    advantages = ddpo.advantages(cfg.algo, all_prompts, reward_out, traj["latents"].shape[-2:], tracker, per_position)
                else:  # beyond the paper: within each group of one prompt (successors.py)
                    advantages = successors.group_advantages(cfg.algo, reward_out, cfg.samples_per_prompt, traj["latents"].shape[-2:], per_position)
                # 4. update the policy on this process's samples
                stats = update(cfg, pipe, traj, advantages[mine], optimizer, params, rng, autocast, progress=rank == 0, base=base)
            stats = parallel.mean_over_processes(stats)
            train_seconds = time.time() - start
            if not all(torch.isfinite(p).all() for p in params):
                stop(f"epoch {epoch}: the weights became non-finite, so nothing of this epoch was saved; resuming would repeat it: start a new run "
                     f"with a lower --lr than {cfg.lr} (the others as in {out / 'config.json'})")
            # 5. log: metrics, samples and weights (rank 0 writes), a checkpoint when due or when asked to stop
            history.append({
                "epoch": epoch, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                "reward_queries": (epoch + 1) * cfg.samples_per_epoch, **stats, **successors.group_stats(cfg, rewards),
                **({"fidelity": parallel.gather(toy_world.judge(traj["images"], prompts).to(device)).mean().item()} if toy_prompts else {}),
                **eval_metrics, "sample_seconds": sample_seconds, "train_seconds": train_seconds,
            })
            stopping = parallel.any_process(bool(stop_requested))
            if rank == 0:
                grid = run_folder.log_epoch(out, cfg, history, pipe, traj["images"], prompts, rewards)
                track(history[-1], grid)  # beyond the paper: --log-with
            if checkpoints.due(cfg, epoch, stopping):
                checkpoints.save(out, cfg, history, pipe, optimizer, tracker, rng, generator, device, rank)
            elapsed = time.time() - session_start
            say(run_folder.console_line(history[-1], elapsed, elapsed / (epoch + 1 - first_epoch) * (cfg.epochs - epoch - 1)))
            if stopping:
                say(f"stopped after epoch {epoch}; continue with: python train.py --resume {out}")
                sys.exit(STOPPED)
        if evaluation_due(cfg, cfg.epochs, rank):  # beyond the paper: the weights the run ends with, evaluated
            history.append(final_row(cfg, evaluate(cfg, pipe, base, eval_prompts, set(prompt_set), reward_fn, autocast, out, cfg.epochs)))
            say(run_folder.log_final_evaluation(out, cfg, history))
    return history


def update(cfg, pipe, traj, advantages, optimizer, params, rng, autocast, progress=False, base=None):
    """DDPO's update (paper, section 4.3 "Denoising Diffusion Policy Optimization"; appendix D.1): the epoch's
    samples, shuffled into cfg.updates_per_epoch minibatches, in cfg.inner_epochs passes. Each sample
    trains on its own random cfg.timestep_fraction of its steps; the gradients of a minibatch's
    samples and steps accumulate into one optimiser step on their mean loss. Given the base policy,
    kl_to_base is measured, and penalised when cfg.kl_coef > 0 (kl_leash)."""
    num_samples = len(traj["log_probs"])
    steps = traj["stochastic"].nonzero()[:, 0].to(traj["latents"].device)  # every step (beyond the paper: --train-window's)
    train_steps = max(1, int(len(steps) * cfg.timestep_fraction))
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)  # of cfg.batch_size samples, per optimiser step
    stats, skipped = defaultdict(list), 0
    batches = shuffled_microbatches(cfg, num_samples, rng, steps.device, steps, train_steps)
    for i, (samples, step_order) in enumerate(tqdm(batches, desc="training", disable=None if progress else True, leave=False)):
        for chunk, (rows, steps, steps_each) in enumerate(fused_steps(cfg, samples, step_order, train_steps)):  # K = 1: a step t each
            with autocast:
                # the stored states s_t = (c, t, x_t), here in the UNet's order (x_t, t, c), and the policy's prediction now
                x_t, t, c = traj["latents"][rows, steps], traj["timesteps"][rows, steps], traj["prompt_embeds"][rows]
                eps = guided_eps(pipe.unet, x_t, t, c, traj["negative_embeds"], cfg.guidance_scale)
                # the action a_t = x_{t-1} is the next stored latent; its log-density under the policy now,
                # by the function that sampled it
                action = traj["latents"][rows, steps + 1]
                _, element_log_prob = ddim_step_with_logprob(pipe.scheduler, eps, t, x_t, cfg.eta, action, reduce="none")
                # averaged over the latent's elements (README, "Why is the log-prob averaged, not summed?")
                log_prob = reduce_elements(element_log_prob, "mean")
                old_log_prob = traj["log_probs"][rows, steps]  # at sampling time
                if cfg.algo == "ddpo-is":  # importance sampling: ratio p_theta / p_old, clipped to 1 +- clip_range
                    loss = ddpo.ddpo_is_loss(log_prob, old_log_prob, advantages[rows], cfg.clip_range, cfg.adv_clip_max)
                elif cfg.algo == "ddpo-sf":  # the score function (REINFORCE), on-policy
                    loss = ddpo.ddpo_sf_loss(log_prob, advantages[rows], cfg.adv_clip_max)
                else:  # pxpo: every latent position its own advantage
                    loss = ddpo.pxpo_loss(element_log_prob, advantages[rows], cfg.adv_clip_max)
                diagnostics = ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)
                if base is not None and (cfg.kl_coef > 0 or chunk == 0):  # beyond the paper: the leash to the base model
                    penalty, diagnostics["kl_to_base"] = kl_leash(cfg, pipe, base, traj, (x_t, t, c), eps, measured=len(samples))
                    loss = loss + penalty
            (loss * steps_each / (train_steps * microbatches)).backward()  # loss is a mean over these states
            for key, value in {"loss": loss.detach(), **diagnostics}.items():
                stats[key].append((value, steps_each))
        if (i + 1) % microbatches == 0:
            skipped += not optimizer_step(cfg, optimizer, params)
    return {**weighted_means(stats), "skipped_updates": skipped}


def shuffled_microbatches(cfg, num_samples, rng, device, steps=None, train_steps=1):
    """cfg.inner_epochs passes over the samples, each in a new random order, cut into microbatches
    of cfg.batch_size rows. Given the steps a sample can train (their indices), each pass also draws
    every sample's own random order of them, of which the first train_steps are trained (else None)."""
    batches = []
    for _ in range(cfg.inner_epochs):
        order = torch.as_tensor(rng.permutation(num_samples), device=device)
        step_order = None if steps is None else steps[torch.as_tensor(rng.random((num_samples, len(steps))).argsort(axis=1)[:, :train_steps], device=device)]
        batches += [(order[start : start + cfg.batch_size], step_order) for start in range(0, num_samples, cfg.batch_size)]
    return batches


def fused_steps(cfg, samples, step_order, train_steps):
    """--steps-per-forward K (speed only): the samples' trained steps, K of each sample's through the
    UNet together. Yields the rows and steps of each forward's states (each sample's row repeated
    once a step), step-major (each sample's first trained step first), and how many steps of each
    sample they are. With K = 1 (the default) each forward is one step of every sample."""
    for chunk in torch.arange(train_steps, device=samples.device).split(cfg.steps_per_forward):
        yield samples.repeat(len(chunk)), step_order[samples][:, chunk].T.flatten(), len(chunk)


def kl_leash(cfg, pipe, base, traj, states, eps, measured):
    """Beyond the paper (DPOK, Flow-GRPO): KL(p_theta || p_base) at these states (sampler.policy_kl)
    from the policy's prediction eps and one more guided forward of the base policy without
    gradient. Returns the penalty, cfg.kl_coef times it, and the KL. At kl_coef 0 it is only
    measured, on the first `measured` states (each sample's first trained step)."""
    part = slice(None if cfg.kl_coef > 0 else measured)
    latents, timesteps, prompt_embeds = (s[part] for s in states)
    with torch.no_grad(), base() as base_unet:
        base_eps = guided_eps(base_unet, latents, timesteps, prompt_embeds, traj["negative_embeds"], cfg.guidance_scale)
    kl = policy_kl(pipe.scheduler, eps[part], base_eps, timesteps, latents, cfg.eta).mean()  # mean over elements, then states
    return cfg.kl_coef * kl, kl.detach()


def rwr_round(cfg, pipe, traj, prompts, rewards, mine, optimizer, params, rng, autocast, progress=False):
    """Reward-weighted regression, the paper's baseline (section 4.2; appendix D.2): weights from
    the epoch's scalar rewards (ddpo.rwr_epoch_weights; this process keeps its rows `mine`), then the
    weighted denoising loss of the guided prediction on the samples x_0, each at one fresh noise
    level per pass, in cfg.inner_epochs passes (ddpo.rwr_loss)."""
    weights = ddpo.rwr_epoch_weights(cfg.algo, prompts, rewards, cfg.beta, per_prompt=cfg.per_prompt_stat_tracking)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=rewards.device)
    selectivity = float(ddpo.weight_share(weights.cpu().numpy()))
    weights = weights[mine]
    num_samples = len(traj["log_probs"])
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)
    stats, skipped = defaultdict(list), 0
    batches = shuffled_microbatches(cfg, num_samples, rng, traj["latents"].device)
    for i, (rows, _) in enumerate(tqdm(batches, desc="training", disable=None if progress else True, leave=False)):
        with autocast:
            loss = rwr_regression_loss(cfg, pipe, traj, weights, rows, rng)
        (loss / microbatches).backward()
        stats["loss"].append((loss.detach(), 1))
        if (i + 1) % microbatches == 0:
            skipped += not optimizer_step(cfg, optimizer, params)
    return {**weighted_means(stats), "skipped_updates": skipped, "weight_share": selectivity}


def rwr_regression_loss(cfg, pipe, traj, weights, rows, rng):
    """RWR's loss on the samples `rows`: the denoising loss of the guided prediction on each x_0,
    noised afresh at a random t, times the sample's weight (ddpo.rwr_loss). The target is what the
    model predicts, the one it was trained on: the noise, or for v-prediction (SD 2.x at 768 px)
    the velocity v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
    x0 = traj["latents"][rows, -1]
    noise = torch.randn_like(x0)
    t = torch.as_tensor(rng.integers(pipe.scheduler.config.num_train_timesteps, size=len(rows)), device=x0.device)
    prediction = guided_eps(pipe.unet, pipe.scheduler.add_noise(x0, noise, t), t, traj["prompt_embeds"][rows], traj["negative_embeds"], cfg.guidance_scale)
    target = pipe.scheduler.get_velocity(x0, noise, t) if pipe.scheduler.config.prediction_type == "v_prediction" else noise
    return ddpo.rwr_loss(prediction, target, weights[rows])


def optimizer_step(cfg, optimizer, params):
    """One step on the accumulated gradient, averaged over the processes and clipped to
    cfg.max_grad_norm; skipped (False) when it is not finite, so the weights stay finite (the
    epoch's skipped_updates count it, and its console line says so)."""
    parallel.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    finite = bool(torch.isfinite(grad_norm))  # a non-finite loss gives a non-finite norm too
    if finite:
        optimizer.step()
    optimizer.zero_grad()
    return finite


def weighted_means(stats):
    """The epoch's mean of each logged value, each weighted by the steps it covers (read from the device once)."""
    return {key: sum(value.double() * n for value, n in pairs).item() / sum(n for _, n in pairs) for key, pairs in stats.items()}


def after_first_batch(cfg, epoch, start, say, reward_fn, images, prompts, total):
    """Beyond the paper: once an epoch's first batch is sampled, your own reward's output checked on
    it (a wrong return ends the run now, not after the epoch), and a long epoch's estimate."""
    if cfg.reward not in config.REWARD_NAMES:  # your own
        reward_fn(images, prompts, check=True)
    run_folder.long_epoch_notice(epoch, start, say, len(prompts), total)


if __name__ == "__main__":
    main(cli_config)

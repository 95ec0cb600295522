"""Beyond the paper: python train.py --preflight [flags], the checks a new model, reward and
settings need before a long run (Flow-GRPO's checklist for a new model), in about a minute, writing
nothing. One line a check: ok, warn or fail, with what to change; exit status 0 when nothing
failed, else 1. docs/reward-not-rising.md reads them, and then a run's own metrics.
"""

import time

import numpy as np
import torch

import ddpo
from machinery.prompts import load_prompts
from machinery.parallel import setup
from machinery.pipeline import DTYPES, add_trainable, autocast, load_model
from machinery.reward_loading import as_scores, load_reward
from sampler import step_with_logprob, guided_prediction, sample_trajectories


def run(cfg):
    """The checks, each printed as it ends; the exit status."""
    failed = []

    def say(status, check, text):
        print(f"preflight: {status:<4} {check}: {text}", flush=True)
        failed.extend([check] if status == "fail" else [])

    _, _, device = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    reward_fn = load_reward(cfg)
    pipe = load_model(cfg, device, DTYPES[cfg.mixed_precision])
    params = add_trainable(pipe, cfg.lora_rank)
    forwards = autocast(device, cfg.mixed_precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # one sampling batch: two prompts, half of it each, so that the spread within a prompt shows
    prompt_set = load_prompts(cfg.prompts)
    chosen = np.random.default_rng(cfg.seed).permutation(len(prompt_set))[:2]
    n = max(2, cfg.sample_batch_size // len(chosen)) * len(chosen)
    prompts = [prompt_set[i] for i in chosen for _ in range(n // len(chosen))]
    start = time.time()
    with forwards:
        traj = sample_trajectories(
            pipe,
            prompts,
            cfg.num_steps,
            cfg.guidance_scale,
            cfg.eta,
            n,
            torch.Generator(device).manual_seed(cfg.seed),
            pipe.family.POLICY,
        )
    sample_seconds = time.time() - start
    say("ok", "sampling", f"{n} images of {len(chosen)} prompts, {cfg.num_steps} steps")
    check_ratio(cfg, pipe, traj, forwards, say)
    rewards = check_reward(cfg, reward_fn, traj["images"], prompts, say)
    train_seconds, states = check_gradient(cfg, pipe, params, traj, rewards, forwards, say)
    estimate(cfg, n, sample_seconds, train_seconds, states, device, say)
    return 1 if failed else 0


def check_ratio(cfg, pipe, traj, autocast, say):
    """On-policy the ratio p_theta / p_old is 1: every step's log-prob recomputed as the update
    recomputes it, against the one sampled."""
    worst = 0.0
    with torch.no_grad(), autocast:
        for k in range(cfg.num_steps):
            x_t, t = traj["latents"][:, k], traj["timesteps"][:, k]
            eps = guided_prediction(
                pipe.unet,
                x_t,
                t,
                traj["prompt_embeds"],
                traj["negative_embeds"],
                cfg.guidance_scale,
                pipe.family.POLICY.predict,
            )
            action = traj["latents"][:, k + 1]
            _, log_prob = step_with_logprob(
                pipe.scheduler, eps, t, x_t, cfg.eta, action, mean_std=pipe.family.POLICY.mean_std
            )
            ratio = (log_prob.float() - traj["log_probs"][:, k].float()).exp()
            worst = max(worst, (ratio - 1).abs().max().item())
    text = f"largest |ratio - 1| on-policy {worst:.1e}, against --clip-range {cfg.clip_range:g}"
    if worst <= cfg.clip_range / 10:
        return say("ok", "log-prob", text)
    fix = (
        "sampling and training must compute the same policy: the same --mixed-precision, no "
        "dropout in the UNet, deterministic kernels"
    )
    say("warn" if worst <= cfg.clip_range else "fail", "log-prob", f"{text}; {fix}")


def check_reward(cfg, reward_fn, images, prompts, say):
    """The reward's return (shape, type, finite) and its spread over the batch and within each
    prompt; the scores, or None when they are not scores."""
    try:
        values = getattr(reward_fn, "raw", reward_fn)(images, prompts)  # unchecked: told here
        scores = ddpo.scalar(as_scores(values, len(prompts), images.shape[-2:], finite=True))
    except Exception as error:  # the reward's code, raising anything
        say("fail", "reward", f"{cfg.reward}: {type(error).__name__}: {error}")
        return None
    scores = scores.double().cpu().numpy()
    within = np.mean([scores[np.array(prompts) == p].std() for p in set(prompts)])
    spread = f"mean {scores.mean():.4g}, std {scores.std():.3g} over the batch"
    if within > 1e-6 * max(np.abs(scores).max(), 1e-12):
        say("ok", "reward", f"{spread}, {within:.3g} within a prompt (the spread advantages use)")
    else:
        say(
            "warn",
            "reward",
            f"{spread}, 0 within each prompt: per-prompt advantages are 0 and nothing trains; a "
            "reward must tell a prompt's images apart",
        )
    return scores


def check_gradient(cfg, pipe, params, traj, rewards, autocast, say):
    """One training forward's gradient, as the update takes it: --batch-size of the samples at
    --steps-per-forward steps from the middle one. Finite, and reaching the weights that can move
    first. No optimiser step: the weights stay as they were. Returns its seconds a state and its
    number of states."""
    if rewards is not None and rewards.std() > 0:
        advantages = torch.as_tensor(ddpo.batch_advantages(rewards), dtype=torch.float32)
        used = "the batch's advantages"
    else:
        advantages = torch.tensor([1.0, -1.0]).repeat(len(traj["prompts"]) // 2)
        used = "advantages of +1 and -1 (the reward gave none)"
    samples = torch.arange(min(cfg.batch_size, len(traj["prompts"])))
    steps = torch.arange(cfg.num_steps // 2, cfg.num_steps)[: cfg.steps_per_forward]
    rows, k = samples.repeat(len(steps)), steps.repeat_interleave(len(samples))
    start = time.time()
    with autocast:
        x_t, t = traj["latents"][rows, k], traj["timesteps"][rows, k]
        c, empty = traj["prompt_embeds"][rows], traj["negative_embeds"]
        policy = pipe.family.POLICY
        eps = guided_prediction(pipe.unet, x_t, t, c, empty, cfg.guidance_scale, policy.predict)
        action = traj["latents"][rows, k + 1]
        _, log_prob = step_with_logprob(
            pipe.scheduler, eps, t, x_t, cfg.eta, action, mean_std=policy.mean_std
        )
        A = advantages[rows].to(log_prob.device)
        loss = ddpo.ddpo_sf_loss(log_prob, A, cfg.adv_clip_max)
    loss.backward()
    seconds = (time.time() - start) / len(x_t)
    named = [(name, p) for name, p in pipe.unet.named_parameters() if p.requires_grad]
    if not all(p.grad is None or torch.isfinite(p.grad).all() for _, p in named):
        say("fail", "gradient", f"not finite, with {used}; lower --lr or use --mixed-precision no")
    else:
        moved = [name for name, p in named if p.grad is not None and p.grad.abs().max() > 0]
        where = f"{len(moved)} of {len(named)} trainable tensors get a gradient, with {used}"
        if not moved:
            say("fail", "gradient", f"{where}: nothing would train; check --lora-rank and --lr")
        elif cfg.lora_rank and all("lora_B" in name for name in moved):
            say(
                "ok",
                "gradient",
                f"{where}: the LoRA's B matrices (its A matrices get one once B is not 0, after "
                "the first step)",
            )
        else:
            say("ok", "gradient", where)
    for p in params:
        p.grad = None
    return seconds, len(x_t)


def estimate(cfg, n, sample_seconds, train_seconds, states, device, say):
    """An epoch's time from this batch's, and on a GPU the peak memory."""
    train_steps = max(1, int(cfg.num_steps * cfg.timestep_fraction))
    sampling = sample_seconds / n * cfg.samples_per_epoch
    training = train_seconds * cfg.samples_per_epoch * train_steps * cfg.inner_epochs
    epoch = sampling + training
    text = (
        f"about {epoch:.0f} s an epoch (sampling {sampling:.0f} s, training {training:.0f} s), "
        f"{epoch * cfg.epochs / 60:.0f} min for {cfg.epochs} epochs, from this batch"
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        text += (
            f"; peak GPU memory {peak:.1f} GiB with {n} images a sampling batch and {states} "
            "states a training forward"
        )
    say("ok", "time", text)

"""Fine-tune a Stable Diffusion 1.x UNet with DDPO (Black et al. 2023). One epoch is:
sample trajectories -> reward -> advantages -> minibatch updates -> log (and checkpoint).

    python train.py --reward jpeg                      # SD v1.4 on CUDA, else the bundled CPU model
    python train.py --model CompVis/stable-diffusion-v1-4 --reward jpeg_incompressibility
    python train.py --algo rwr                         # or ddpo-sf, rwr-sparse, pxpo
    python train.py --resume runs/<run>                # after a crash or Ctrl-C, exactly where it stopped
    torchrun --nproc-per-node 8 train.py --reward jpeg # data parallel over 8 GPUs (parallel.py)

Defaults are the paper's SD v1.4 settings; with the bundled model the preset "tiny" scales them to a
CPU (every flag given still wins); config.py holds them all. The policy and its log-prob are in
sampler.py, advantages and losses in ddpo.py, rewards in rewards.py, the fixed-noise evaluation in
evaluation.py, the run folder in run_folder.py.
"""
import dataclasses
import functools
import os
import signal
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

for library in ("TRANSFORMERS", "DIFFUSERS"):  # before they are imported: keep the console for results
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

import ddpo
import parallel
import toy_world
from evaluation import evaluate
from config import DTYPES, fail, load_prompts, parse_args
from rewards import REWARDS, aesthetic, alignment, hub_reachable, scalar
from run_folder import cut_metrics, load_checkpoint, log_epoch, save_checkpoint, write_config
from sampler import (add_trainable, base_policy, compile_policy, gaussian_log_prob, guided_eps, load_pipeline, policy_gaussian, policy_kl,
                     sample_trajectories, save_weights)


def objective(cfg, pipe, traj, advantages, rows, steps, rng, base=None, leashed=None):
    """The loss of samples `rows` at their timestep indices `steps`, and DDPO's diagnostics. Given
    the base policy, also the KL leash: kl_to_base on the first `leashed` of these states (default:
    all), added times cfg.kl_coef."""
    embeds = traj["prompt_embeds"][rows]
    if cfg.algo.startswith("rwr"):  # the denoising loss of the guided prediction on the sample x_0, fresh noise, any t
        x0 = traj["latents"][rows, -1]
        noise = torch.randn_like(x0)
        t = torch.as_tensor(rng.integers(pipe.scheduler.config.num_train_timesteps, size=len(rows)), device=x0.device)
        eps_pred = guided_eps(pipe.unet, pipe.scheduler.add_noise(x0, noise, t), t, embeds, traj["negative_embeds"], cfg.guidance_scale)
        return ddpo.rwr_loss(eps_pred, noise, advantages[rows]), {}
    state = (traj["latents"][rows, steps], traj["timesteps"][rows, steps], embeds, traj["negative_embeds"], cfg.guidance_scale, cfg.eta)
    mean, std = policy_gaussian(pipe, pipe.unet, *state)
    log_prob = gaussian_log_prob(traj["latents"][rows, steps + 1], mean, std, reduce="none" if cfg.algo == "pxpo" else "mean")
    old_log_prob = traj["log_probs"][rows, steps]
    if cfg.algo == "pxpo":
        loss = ddpo.pxpo_loss(log_prob, advantages[rows], cfg.adv_clip_max)
        log_prob = log_prob.mean(dim=(1, 2, 3))
    elif cfg.algo == "ddpo-sf":
        loss = ddpo.ddpo_sf_loss(log_prob, advantages[rows], cfg.adv_clip_max)
    else:
        loss = ddpo.ddpo_is_loss(log_prob, old_log_prob, advantages[rows], cfg.clip_range, cfg.adv_clip_max)
    diagnostics = ddpo.diagnostics(log_prob, old_log_prob, cfg.clip_range)
    if base is not None:  # one more guided forward, without gradient: the base policy's mean on the same states
        part = slice(leashed)
        with torch.no_grad(), base() as base_unet:
            base_mean, _ = policy_gaussian(pipe, base_unet, state[0][part], state[1][part], state[2][part], *state[3:])
        kl = policy_kl(mean[part], base_mean, std[part]).mean()  # mean over elements, as the log-prob; then over the states
        loss = loss + cfg.kl_coef * kl
        diagnostics["kl_to_base"] = kl.detach()
    return loss, diagnostics


def update(cfg, pipe, traj, advantages, optimizer, params, rng, autocast, progress, base=None):
    """Minibatch updates on one epoch's samples (section 4.2), in cfg.inner_epochs passes over
    them. Each pass shuffles the samples, and each sample visits its own random order of
    timesteps, cfg.steps_per_forward of them through the UNet together; gradients accumulate over
    the steps and the microbatches of one minibatch (and are averaged over the processes), so each
    optimiser step sees the mean loss over all of them. kl_to_base is measured on every trained step
    when it is penalised (cfg.kl_coef > 0), else only on each sample's first trained step (a random
    one of them): the metric at a small cost."""
    num_samples, num_steps = traj["log_probs"].shape
    device = traj["latents"].device
    # DDPO trains on a fraction of each trajectory's steps; RWR regresses x_0 at one fresh noise level per visit
    train_steps = 1 if cfg.algo.startswith("rwr") else max(1, int(num_steps * cfg.timestep_fraction))
    chunks = torch.arange(train_steps, device=device).split(cfg.steps_per_forward)  # the steps that share a forward
    microbatches = num_samples // (cfg.updates_per_epoch * cfg.batch_size)  # per optimiser step, in this process
    batches = []
    for _ in range(cfg.inner_epochs):
        order = torch.as_tensor(rng.permutation(num_samples), device=device)
        step_order = torch.as_tensor(rng.random((num_samples, num_steps)).argsort(axis=1)[:, :train_steps], device=device)
        batches += [(order[start : start + cfg.batch_size], step_order) for start in range(0, num_samples, cfg.batch_size)]
    stats, skipped = defaultdict(list), 0
    for i, (rows, step_order) in enumerate(tqdm(batches, desc="training", disable=None if progress else True, leave=False)):
        for c, chunk in enumerate(chunks):
            with autocast:
                leash = base if cfg.kl_coef > 0 or c == 0 else None
                leashed = None if cfg.kl_coef > 0 else len(rows)  # only measured: on each sample's first step, the first len(rows) states
                steps = step_order[rows][:, chunk].T  # (steps of this chunk, samples): through the UNet together, each sample's first step first
                loss, diagnostics = objective(cfg, pipe, traj, advantages, rows.repeat(len(chunk)), steps.flatten(), rng, leash, leashed)
            (loss * len(chunk) / (train_steps * microbatches)).backward()  # loss is a mean over the chunk's states
            for key, value in {"loss": loss.detach(), **diagnostics}.items():
                stats[key].append((value, len(chunk)))
        if (i + 1) % microbatches == 0:
            parallel.average_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if torch.isfinite(grad_norm):  # a non-finite loss gives a non-finite norm too
                optimizer.step()
            else:
                skipped += 1
                print(f"skipped an update: non-finite loss or gradient (norm {grad_norm.item()}); the weights are unchanged", file=sys.stderr)
            optimizer.zero_grad()
    means = {key: sum(value.double() * n for value, n in pairs).item() / sum(n for _, n in pairs) for key, pairs in stats.items()}
    return {**means, "skipped_updates": skipped}


STOPPED = 75  # exit status of a run stopped cleanly by a signal at a checkpoint: resume it (EX_TEMPFAIL, "try again")


def stop(message):
    """End the run (exit status 1) for a reason that resuming would not fix by itself."""
    print(f"train.py: stopped: {message}", file=sys.stderr)
    sys.exit(1)


def load_reward(cfg):
    """The reward function. The learned ones load their models here, once, for this run (and go
    with it); one that cannot load stops the run before it writes anything."""
    try:
        if cfg.reward == "aesthetic":
            return aesthetic(cfg.aesthetic_model, cfg.device)
        if cfg.reward == "alignment":
            return alignment(cfg.alignment_model, cfg.bertscore_model, cfg.bertscore_layer, cfg.device)
    except OSError as error:
        fail(str(error))
    if cfg.reward in ("pixel_color", "pixel_background"):
        return functools.partial(REWARDS[cfg.reward], target=[float(v) for v in cfg.target_color.split(",")])
    return REWARDS[cfg.reward]


def read_checkpoint(cfg, world):
    """The state to resume from, checked before anything is loaded or written."""
    state = load_checkpoint(Path(cfg.out))
    if len(state["rng"]) != world:
        fail(f"--resume {cfg.out}: the run was trained by {len(state['rng'])} process(es), not {world}; resume it with as many")
    if len(state["history"]) >= cfg.epochs:
        fail(f"--resume {cfg.out}: the run has done {len(state['history'])} epochs of --epochs {cfg.epochs}; "
             f"give --epochs above {len(state['history'])} to run it further")
    return state


def restore(state, cfg, pipe, optimizer, tracker, rng, generator, rank, device):
    """Everything a fresh run would hold after the checkpoint's epoch: weights, optimiser, reward
    buffers, this process's random streams; its metrics."""
    pipe.unet.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if tracker is not None:
        tracker.buffers.update({prompt: deque(values, maxlen=cfg.buffer_size) for prompt, values in state["buffers"].items()})
    own = state["rng"][rank]
    rng.bit_generator.state = own["numpy"]
    torch.set_rng_state(own["torch"])
    generator.set_state(own["generator"])
    if own["cuda"] is not None:
        torch.cuda.set_rng_state(own["cuda"], device)
    return state["history"]


def main(argv=None):
    cfg = parse_args(argv, description=__doc__)
    rank, world, device = parallel.setup(cfg.device)  # (0, 1, cfg.device) without torchrun
    state = read_checkpoint(cfg, world) if cfg.resume else None
    say = print if rank == 0 else lambda *args, **kwargs: None
    seed = cfg.seed + rank * parallel.SEED_STRIDE  # this process's own seed; rank 0's is --seed
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every process
    rng = np.random.default_rng(seed)  # prompts, shuffles, timestep orders
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    weight_dtype = DTYPES[cfg.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=cfg.mixed_precision != "no")
    reward_fn = load_reward(cfg)
    try:
        pipe = load_pipeline(cfg.model, device, weight_dtype, local_files_only=not hub_reachable())
    except OSError as error:
        if Path(cfg.model).is_dir():
            fail(f"--model {cfg.model}: not a readable diffusers pipeline folder ({type(error).__name__}); pass a folder saved by "
                 f"save_pretrained (model_index.json and its parts), or a hub id")
        fail(f"--model {cfg.model}: cannot load it ({type(error).__name__}: no network, not in the hub cache, or no such model); "
             f"download it first with `hf download {cfg.model}`, or pass a local folder")
    params = add_trainable(pipe.unet, cfg.lora_rank)
    base = base_policy(pipe.unet, cfg.lora_rank) if cfg.eval_every or not cfg.algo.startswith("rwr") else None  # before any update
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
    eval_prompts = [eval_set[k % len(eval_set)] for k in range(cfg.eval_samples)]
    tracker = ddpo.PerPromptStatTracker(cfg.buffer_size, cfg.min_count) if cfg.per_prompt_stat_tracking else None
    toy_prompts = set(prompt_set) <= set(toy_world.PROMPTS)  # then the toy world's judge reports fidelity
    trainable = {name for name, p in pipe.unet.named_parameters() if p.requires_grad}

    out, history = Path(cfg.out), []
    parallel.barrier()  # every process has checked --out before rank 0 writes into it
    if cfg.resume:
        history = restore(state, cfg, pipe, optimizer, tracker, rng, generator, rank, device)
        if rank == 0:
            cut_metrics(out, history)
        say(f"resuming {out} after epoch {state['epoch']}")
    elif rank == 0:
        write_config(out, dataclasses.asdict(cfg))
    say(f"{cfg.algo} on {cfg.model} ({device}{f' x {world} processes' if world > 1 else ''}), reward {cfg.reward}, "
        f"{len(prompt_set)} prompts -> {out}")
    interrupted = []

    def on_signal(signum, frame):  # the first Ctrl-C, or SIGTERM (preemption, time limits): finish the epoch and its checkpoint
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(f"\n{signal.Signals(signum).name}: stopping after this epoch's checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    previous_handlers = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(len(history), cfg.epochs):
            # 0. evaluate, every eval_every epochs and at the last one (rank 0 alone)
            evaluation = cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) and rank == 0
            eval_metrics = evaluate(cfg, pipe, base, eval_prompts, set(prompt_set), reward_fn, autocast, out, epoch) if evaluation else {}
            # 1. sample: roll out the current policy, one trajectory per drawn prompt (this process's share)
            start = time.time()
            prompts = [prompt_set[i] for i in rng.integers(len(prompt_set), size=cfg.samples_per_epoch // world)]
            with autocast:
                traj = sample_trajectories(pipe, prompts, cfg.num_steps, cfg.guidance_scale, cfg.eta, cfg.batch_size, generator, progress=rank == 0)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the GPU's queue is done: an honest sampling time
            sample_seconds = time.time() - start
            # 2. reward r(x_0, c) on the decoded images (a map (B, H, W) for a pixel-wise reward), then every process's
            reward_out = parallel.gather(reward_fn(traj["images"], prompts).float().to(device))
            all_prompts = parallel.gather_objects(prompts)
            if not torch.isfinite(reward_out).all():
                stop(f"epoch {epoch}: the reward {cfg.reward} returned non-finite values, so nothing of this epoch was trained on or saved; "
                     f"fix the reward, then continue with --resume {out}")
            rewards = scalar(reward_out)
            # 3. advantages over the whole epoch (RWR: weights); this process keeps its own samples' rows
            advantages = ddpo.advantages(cfg.algo, all_prompts, reward_out, traj["latents"].shape[-2:], tracker, cfg.beta)
            selectivity = {"weight_share": float(ddpo.weight_share(advantages.cpu().numpy()))} if cfg.algo.startswith("rwr") else {}
            advantages = advantages[rank * len(prompts) : (rank + 1) * len(prompts)]
            # 4. update the policy on these samples
            start = time.time()
            stats = update(cfg, pipe, traj, advantages, optimizer, params, rng, autocast, progress=rank == 0, base=base)
            stats = parallel.mean_over_processes(stats)
            train_seconds = time.time() - start
            if not all(torch.isfinite(p).all() for p in params):
                stop(f"epoch {epoch}: the weights became non-finite; the last checkpoint is kept; lower --lr and continue with --resume {out}")
            # 5. log, export the weights, checkpoint (rank 0 writes; every process hands over its random states)
            metrics = {
                "epoch": epoch, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                "reward_queries": (epoch + 1) * cfg.samples_per_epoch, **stats, **selectivity,
                **({"fidelity": parallel.gather(toy_world.judge(traj["images"], prompts).to(device)).mean().item()} if toy_prompts else {}),
                **eval_metrics, "sample_seconds": sample_seconds, "train_seconds": train_seconds,
            }
            history.append(metrics)
            stopping = parallel.any_process(bool(interrupted))
            checkpoint = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stopping
            rng_states = parallel.gather_objects([{
                "numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "generator": generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }] if checkpoint else [])
            if rank == 0:
                log_epoch(out, history, traj["images"], [f"{p[:20]}\n{r:.2f}" for p, r in zip(prompts, rewards.tolist())], cfg.reward)
                save_weights(pipe, out, cfg.lora_rank)
            if rank == 0 and checkpoint:
                save_checkpoint(out, {
                    "epoch": epoch, "history": history, "optimizer": optimizer.state_dict(), "rng": rng_states,
                    "trainable": {name: p for name, p in pipe.unet.state_dict().items() if name in trainable},
                    "buffers": {prompt: [float(v) for v in values] for prompt, values in tracker.buffers.items()} if tracker is not None else {},
                }, cfg.keep_checkpoints)
            fidelity = f" fidelity {metrics['fidelity']:.3f}" if toy_prompts else ""
            ppo = f" kl {stats['approx_kl']:.2e} clipfrac {stats['clipfrac']:.3f}" if "approx_kl" in stats else ""
            ppo += f" kl_to_base {stats['kl_to_base']:.2e}" if "kl_to_base" in stats else ""
            ppo += f" | 90 % of the weight on {selectivity['weight_share']:.0%} of samples" if selectivity else ""
            ppo += f" | eval {eval_metrics['eval_reward_mean']:.3f}" if eval_metrics else ""
            say(
                f"epoch {epoch}: reward {metrics['reward_mean']:.3f} ± {metrics['reward_std']:.3f}{fidelity} | loss {stats['loss']:.4g}{ppo} "
                f"| sample {sample_seconds:.1f}s train {train_seconds:.1f}s"
            )
            if stopping:
                say(f"stopped after epoch {epoch}; continue with: python train.py --resume {out}")
                sys.exit(STOPPED)
    except KeyboardInterrupt:
        print(f"\nstopped during an epoch; its work is lost, the checkpoints before it are not: python train.py --resume {out}", file=sys.stderr)
        sys.exit(130)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        parallel.teardown()
    return history


if __name__ == "__main__":
    main()

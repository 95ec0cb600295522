"""The fixed-noise evaluation (--eval-every): the reward of a fixed set of prompts from fixed noise
over training, and how far the policy has moved from the base model. It is not part of DDPO:
train.py runs it as phase 0 of an epoch, and once more after the last epoch's update, to watch for
overoptimisation and, with prompts it never trains on, for generalisation (the paper's section 6.3).
"""

import time

import torch

import toy_world
from ddpo import scalar
from machinery import nft
from machinery.leash import KLToBase
from machinery.epoch_log import save_grid
from sampler import sample_trajectories

# the evaluation's noise, the same in every run and every epoch (arXiv 2305.13301's date)
EVAL_SEED = 20_230_522


def evaluation_due(cfg, epoch, rank):
    """Before epoch 0 (the base model), every cfg.eval_every epochs (0: never) and after the last
    (epoch = cfg.epochs: the weights the run ends with), on rank 0 alone."""
    return (
        bool(cfg.eval_every) and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and rank == 0
    )


def evaluate(cfg, pipe, base, prompts, trained, reward_fn, autocast, out, epoch):
    """The fixed-noise evaluation of the weights after `epoch` epochs of updates
    (eval_after_epochs): before that epoch's sampling (so it sees the policy that samples the
    epoch), or, at epoch = cfg.epochs, after the run's last update. The same prompts from the same
    noise every time, drawn from a generator of its own, so the training's random streams are
    untouched and a resumed run evaluates as a straight one. It logs the mean reward, the KL to the
    base model on the states the policy visits and the toy world's fidelity; split by trained and
    held-out prompts when the prompts hold both (section 6.3)."""
    start = time.time()
    generator = torch.Generator(pipe.unet.device).manual_seed(EVAL_SEED)
    num_steps, measure = cfg.eval_num_steps or cfg.num_steps, None
    if cfg.algo == "nft":  # NFT's policy samples with the ODE, whose steps have no KL to measure
        options = nft.sampling_options(num_steps)
    else:
        measure = KLToBase(pipe, base, cfg.eta, pipe.family.POLICY)
        options = {"on_step": measure}
    with autocast:
        traj = sample_trajectories(
            pipe,
            prompts,
            num_steps,
            cfg.guidance_scale,
            cfg.eta,
            cfg.sample_batch_size,
            generator,
            pipe.family.POLICY,
            decode_batch_size=cfg.batch_size,
            **options,
        )
    values = {"reward_mean": scalar(reward_fn(traj["images"], prompts).float().cpu())}
    if measure is not None:
        values["kl_to_base"] = measure.kl().float().mean(dim=1).cpu()
    judge = toy_world.fidelity_judge(prompts)
    if judge:
        values["fidelity"] = judge(traj["images"], prompts)
    heldout = torch.tensor([prompt not in trained for prompt in prompts])
    groups = {"eval": torch.ones_like(heldout)}
    if 0 < heldout.sum() < len(prompts):
        groups.update(eval_trained=~heldout, eval_heldout=heldout)
    metrics = {
        f"{group}_{key}": value[rows].mean().item()
        for group, rows in groups.items()
        for key, value in values.items()
    }
    captions = [
        f"{p[:20]}{' (held out)' if h else ''}\n{r:.2f}"
        for p, h, r in zip(prompts, heldout.tolist(), values["reward_mean"].tolist())
    ]
    save_grid(traj["images"][:16], captions[:16], out / "samples" / f"eval_epoch_{epoch:04d}.png")
    return {**metrics, "eval_after_epochs": epoch, "eval_seconds": time.time() - start}


def final_row(cfg, evaluated):
    """metrics.jsonl's last row when the run evaluates: the evaluation of the weights it ends with,
    a row of its own after the last epoch's (epoch = cfg.epochs, as if before an epoch that does
    not run), with the reward queries spent to get there."""
    return {"epoch": cfg.epochs, "reward_queries": cfg.epochs * cfg.samples_per_epoch, **evaluated}

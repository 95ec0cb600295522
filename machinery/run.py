"""The run around the paper's loop: what train.main holds that is not DDPO. One Run owns the
processes (torchrun) and this process's seeds and random streams, the model, its trainable weights
and the optimiser, the prompts, the run folder with its lock, stop signals and trackers, resume and
checkpoints, the console, and the extensions' places: the evaluation before sampling and after the
last epoch, the successors' sampling options and group advantages, the KL leash's loss term,
several trained steps in one forward. train.main calls it at its fixed places, in the paper's order.
"""

import contextlib
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ddpo
import toy_world
from machinery import (
    checkpoints,
    config,
    epoch_log,
    nft,
    parallel,
    run_folder,
    successors,
    trackers,
)
from machinery.errors import stop
from machinery.prompts import load_prompts
from machinery.reward_specs import REWARDS
from machinery.evaluation import evaluate, evaluation_due, final_row
from machinery.leash import base_policy
from machinery.pipeline import (
    DTYPES,
    add_trainable,
    autocast,
    compile_policy,
    load_model,
    prompt_losses,
)
from machinery.reward_loading import load_reward, python_reward


class Run(contextlib.ExitStack):
    """A training run of cfg's settings, set up in the order that keeps every random stream where a
    straight run has it; entered, it holds its folder (lock, stop signals, trackers) and resumes.
    It has what train.update uses of a run under train.Learner's names. make_optimizer(cfg, params):
    the optimiser of the trainable weights (train.adamw)."""

    def __init__(self, cfg, reward_fn, make_optimizer):
        super().__init__()
        cfg = self.cfg = python_reward(cfg, reward_fn)
        # (0, 1, cfg.device) without torchrun
        self.rank, self.world, self.device = parallel.setup(cfg.device)
        self.resumed = checkpoints.read(cfg, self.world) if cfg.resume else None
        # above the progress bars
        self.say = tqdm.write if self.rank == 0 else lambda *args, **kwargs: None
        # this process's own seed; rank 0's is --seed
        seed = cfg.seed + self.rank * parallel.SEED_STRIDE
        torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every process
        self.rng = np.random.default_rng(seed)  # prompts, shuffles, timestep orders
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        dtype = DTYPES[cfg.mixed_precision]
        self.autocast = autocast(self.device, cfg.mixed_precision)
        self.reward_fn = load_reward(cfg, reward_fn)
        # the model of --model, checked for what the run asks of it; its family's policy
        self.pipe = load_model(cfg, self.device, dtype)
        self.policy = self.pipe.family.POLICY
        self.params = add_trainable(self.pipe, cfg.lora_rank)
        self.old_policy = nft.old_policy(cfg, self.params)  # NFT's sampling policy, else None
        # the base policy, before any update
        self.base = base_policy(self.pipe.unet, cfg.lora_rank) if config.base_needed(cfg) else None
        if cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        if cfg.compile:
            compile_policy(self.pipe, self.base)
        if self.rank:  # after the shared initialisation, this process's own (RWR's noise)
            torch.manual_seed(seed)
        self.optimizer = make_optimizer(cfg, self.params)
        self.generator = torch.Generator(self.device).manual_seed(seed)  # the sampling noise
        self.prompt_set = load_prompts(cfg.prompts)
        self.eval_set = load_prompts(cfg.eval_prompts or cfg.prompts, "--eval-prompts")
        sets = {
            "--prompts": self.prompt_set,
            "--eval-prompts": self.eval_set if cfg.eval_prompts else [],
        }
        for notice in prompt_losses(self.pipe.tokenizer, sets):  # what the encoder will not see
            self.say(f"train.py: warning: {notice}", file=sys.stderr)
        self.eval_prompts = [self.eval_set[k % len(self.eval_set)] for k in range(cfg.eval_samples)]
        per_position = cfg.pxpo_normalise == "position"
        self.tracker = (
            ddpo.PerPromptStatTracker(cfg.buffer_size, cfg.min_count, per_position)
            if cfg.per_prompt_stat_tracking
            else None
        )
        # the toy world's judge reports fidelity, when the prompts are all of one of its worlds
        self.judge = toy_world.fidelity_judge(self.prompt_set)
        self.out, self.history, self.progress = Path(cfg.out), [], self.rank == 0
        # this process's share of an epoch's samples, and its rows among every process's
        self.share = cfg.samples_per_epoch // self.world
        self.mine = slice(self.rank * self.share, (self.rank + 1) * self.share)
        parallel.barrier()  # every process has checked --out before rank 0 writes into it
        self.first_epoch = self.resumed["epoch"] + 1 if self.resumed else 0

    def __enter__(self):
        contextlib.ExitStack.__enter__(self)
        cfg, out = self.cfg, self.out
        # one train.py a folder
        needed = run_folder.epoch_bytes(self.params)
        self.enter_context(run_folder.claim(out, cfg.resume, self.rank, needed))
        self.stop_requested = self.enter_context(run_folder.stop_signals(out))
        self.track = self.enter_context(trackers.tracking(cfg, out, self.first_epoch, self.rank))
        if cfg.resume:
            self.history = checkpoints.restore(self.resumed, self)
            if self.rank == 0:  # your reward's file as the run goes on with it
                run_folder.update_config(out, reward_sha256=cfg.reward_sha256)
            self.say(
                f"resuming {out} after epoch {self.resumed['epoch']}"
                if self.resumed
                else f"{out} has no checkpoint yet: its run starts again from epoch 0"
            )
        elif self.rank == 0:
            run_folder.write_config(
                out,
                dataclasses.asdict(cfg),
                self.prompt_set,
                self.eval_set if cfg.eval_prompts else None,
            )
        processes = f" x {self.world} processes" if self.world > 1 else ""
        self.say(
            f"{cfg.algo} on {cfg.model} ({self.device}{processes}), reward {cfg.reward}, "
            f"{len(self.prompt_set)} prompts -> {out}"
        )
        self.session_start = time.time()
        return self

    def epochs(self):
        """The epochs this session runs, with their progress bar; then the final weights'
        evaluation."""
        cfg = self.cfg
        yield from tqdm(
            range(self.first_epoch, cfg.epochs),
            desc="epochs",
            total=cfg.epochs,
            initial=self.first_epoch,
            disable=None if self.rank == 0 else True,
        )
        # beyond the paper: the weights the run ends with, evaluated
        if evaluation_due(cfg, cfg.epochs, self.rank):
            self.history.append(final_row(cfg, self.evaluate(cfg.epochs)))
            self.say(epoch_log.log_final_evaluation(self.out, cfg, self.history))

    def evaluate(self, epoch):
        trained = set(self.prompt_set)
        return evaluate(
            self.cfg,
            self.pipe,
            self.base,
            self.eval_prompts,
            trained,
            self.reward_fn,
            self.autocast,
            self.out,
            epoch,
        )

    def before_sampling(self, epoch):
        """Beyond the paper: the fixed-noise evaluation, before epoch 0 and every --eval-every
        epochs. Then the sampling's clock starts."""
        due = evaluation_due(self.cfg, epoch, self.rank)
        self.eval_metrics = self.evaluate(epoch) if due else {}
        self.start = time.time()

    def sampling_options(self, epoch, prompts):
        """sample_trajectories' options beyond the paper's: the progress bar, the decode's batch, a
        check of your own reward on the first batch and a long epoch's estimate, the successors'
        window and shared x_T."""
        cfg = self.cfg
        check = functools.partial(self.after_batch, epoch, [])
        extra = successors.sampling_options(
            cfg, self.pipe, self.rng, self.generator, len(prompts), cfg.num_steps
        )
        # the VAE decodes --batch-size images at a time: on a CPU a decode of the bundled
        # model's 64 images at once takes 2.4 times as long (docs/speed.md)
        decoding = {"decode_batch_size": cfg.batch_size}
        if self.old_policy is not None:  # NFT samples with the ODE
            extra.update(nft.sampling_options(cfg.num_steps))
        return {"progress": self.progress, "after_batch": check, **decoding, **extra}

    def sampling_weights(self):
        """The weights that sample an epoch: NFT's sampling policy (machinery/nft.py), else the
        trained ones."""
        return self.old_policy.weights() if self.old_policy else contextlib.nullcontext()

    def after_batch(self, epoch, first_batch, images, prompts, first, total):
        """Once a batch is sampled: your own reward's output is checked on the epoch's first batch
        (a wrong return ends the run now, not after the epoch), and a long epoch's estimate is
        given. A served reward's request for each batch leaves now (served.py); its first batch's
        answer is checked once the second batch is sampled, the server having scored it meanwhile.
        After the last batch the sampling's clock stops."""
        reward_fn = self.reward_fn
        served = hasattr(reward_fn, "submit")
        if served:
            reward_fn.submit(images, prompts)
        if first == 0:
            first_batch.extend([images, prompts])  # kept for the check
            epoch_log.long_epoch_notice(epoch, self.start, self.say, len(prompts), total)
        if self.cfg.reward not in REWARDS and first == (len(first_batch[1]) if served else 0):
            reward_fn(*first_batch, check=True)  # your own or a served reward
        if first + len(prompts) == total:
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the GPU's queue is done: an honest sampling time
            self.sample_seconds = time.time() - self.start

    def gather_rewards(self, epoch, rewards, prompts):
        """Every process's prompts and rewards (a map (B, H, W) for a pixel-wise reward), in rank
        order; a non-finite reward stops the run before anything of the epoch is trained or
        saved. The training's clock starts."""
        rewards = parallel.gather(rewards.float().to(self.device))
        if not torch.isfinite(rewards).all():
            stop(
                f"epoch {epoch}: the reward {self.cfg.reward} returned non-finite values, so "
                "nothing of this epoch was trained on or saved; fix the reward, then continue "
                f"with --resume {self.out}"
            )
        terms = getattr(self.reward_fn, "terms", {})  # --rewards: each term's raw scores
        details = getattr(self.reward_fn, "details", {})  # a reward's own measures (ocr: exact)
        self.term_means = {
            f"reward_{kind}{name}": parallel.gather(value.float().to(self.device)).mean().item()
            for kind, values in (("mean_", terms), ("", details))
            for name, value in values.items()
        }
        self.start = time.time()
        return parallel.gather_objects(prompts), rewards

    def log(self, epoch, traj, prompts, rewards, stats):
        """The epoch's metrics (rank 0 writes them, its samples and weights, and tells the
        tracker), a checkpoint when due or when asked to stop, the console line; then a stop, when
        asked for."""
        cfg, out = self.cfg, self.out
        stats = parallel.mean_over_processes(stats)
        train_seconds = time.time() - self.start
        if not all(torch.isfinite(p).all() for p in self.params):
            stop(
                f"epoch {epoch}: the weights became non-finite, so nothing of this epoch was "
                "saved; resuming would repeat it: start a new run with a lower --lr than "
                f"{cfg.lr} (the others as in {out / 'config.json'})"
            )
        judged = (
            parallel.gather(self.judge(traj["images"], prompts).to(self.device))
            if self.judge
            else None
        )
        self.history.append(
            {
                "epoch": epoch,
                "reward_mean": rewards.mean().item(),
                "reward_std": rewards.std(unbiased=False).item(),
                **self.term_means,
                "reward_queries": (epoch + 1) * cfg.samples_per_epoch,
                **stats,
                **successors.group_stats(cfg, rewards),
                **({"fidelity": judged.mean().item()} if self.judge else {}),
                **self.eval_metrics,
                "sample_seconds": self.sample_seconds,
                "train_seconds": train_seconds,
            }
        )
        stopping = parallel.any_process(bool(self.stop_requested))
        if self.rank == 0:
            grid = epoch_log.log_epoch(
                out, cfg, self.history, self.pipe, traj["images"], prompts, rewards
            )
            self.track(self.history[-1], grid)  # beyond the paper: --log-with
        if checkpoints.due(cfg, epoch, stopping):
            checkpoints.save(self)
        elapsed = time.time() - self.session_start
        left = elapsed / (epoch + 1 - self.first_epoch) * (cfg.epochs - epoch - 1)
        self.say(epoch_log.console_line(self.history[-1], elapsed, left))
        if stopping:
            self.say(f"stopped after epoch {epoch}; continue with: python train.py --resume {out}")
            sys.exit(run_folder.STOPPED)

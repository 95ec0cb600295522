"""Seconds per epoch of this project's train.py and of TRL's DDPOTrainer, same model, same settings.

    pip install trl==0.23.1                      # the last TRL with DDPO; only for this benchmark
    python benchmarks/vs_trl.py --pairs 3 --epochs 5
    python benchmarks/vs_trl.py --sides ours ours-compiled trl

Both sides run the bundled model with the `tiny` preset's settings: 64 samples an epoch in batches
of 16, 20 DDIM steps, eta 1, guidance 3, LoRA rank 4 on the attention projections, DDPO_IS with 4
updates of 16 a epoch on half of each trajectory's steps, lr 5e-3, clip range 8e-4, advantages
clipped to 5, per-prompt statistics (buffer 32, min count 16), the JPEG reward on the `shapes`
prompts, fp32. Each run is its own process (a fresh interpreter, the machine's threads), and the
sides take turns: ours, TRL, ours, TRL... An epoch's time is the wall clock from the start of its
sampling to the start of the next (the last: to the end of its update), everything included: for
ours also the logging and the checkpoint it writes every epoch. The first epoch of each run warms
up and is not counted; the table gives each side's per-epoch median over all its counted epochs,
every run's own median, and the ratio. `ours-compiled` is train.py with --compile; its first epoch
holds the compiling, reported apart.
"""
import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = dict(num_steps=20, guidance_scale=3.0, samples=64, batch_size=16, updates=4, timestep_fraction=0.5, lr=5e-3, clip_range=8e-4)


def run_ours(epochs, model, compile=False):
    """train.main on the tiny preset (whose settings are SETTINGS): each epoch's seconds."""
    import train
    starts, sample_trajectories = [], train.sample_trajectories

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return sample_trajectories(*args, **kwargs)

    train.sample_trajectories = timed
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", model, "--preset", "tiny", "--reward", "jpeg", "--epochs", str(epochs), "--out", f"{tmp}/run", "--seed", "0",
                    *(["--compile"] if compile else [])])
        starts.append(time.perf_counter())
    return list(np.diff(starts))


def run_trl(epochs, model):
    """TRL's DDPOTrainer.step, once an epoch, at SETTINGS: each epoch's seconds."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    import toy_world
    from rewards import jpeg_compressibility
    rng = np.random.default_rng(0)
    PartialState()  # the pipeline logs (no LoRA in the folder) through accelerate, which needs its state first
    with tempfile.TemporaryDirectory() as tmp:
        config = DDPOConfig(
            num_epochs=epochs, seed=0, logdir=tmp, save_freq=10**9, mixed_precision="no", log_with=None,
            sample_num_steps=SETTINGS["num_steps"], sample_eta=1.0, sample_guidance_scale=SETTINGS["guidance_scale"],
            sample_batch_size=SETTINGS["batch_size"], sample_num_batches_per_epoch=SETTINGS["samples"] // SETTINGS["batch_size"],
            train_batch_size=SETTINGS["samples"] // SETTINGS["updates"], train_gradient_accumulation_steps=1,
            train_learning_rate=SETTINGS["lr"], train_adam_weight_decay=1e-4, train_clip_range=SETTINGS["clip_range"], train_adv_clip_max=5.0,
            train_timestep_fraction=SETTINGS["timestep_fraction"], per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=32, per_prompt_stat_tracking_min_count=16,
        )
        trainer = DDPOTrainer(
            config,
            lambda images, prompts, metadata: (jpeg_compressibility(images, prompts), {}),
            lambda: (toy_world.PROMPTS[rng.integers(len(toy_world.PROMPTS))], {}),
            DefaultDDPOStableDiffusionPipeline(model, use_lora=True),
        )
        seconds, global_step = [], 0
        for epoch in range(epochs):
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None):
    from config import BUNDLED_MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="rounds of the sides taking turns")
    parser.add_argument("--epochs", type=int, default=5, help="epochs a run; the first is not counted")
    parser.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "ours-compiled", "trl"])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # one run, in this process: what the rounds start
    args = parser.parse_args(argv)
    if args.side:
        seconds = run_trl(args.epochs, args.model) if args.side == "trl" else run_ours(args.epochs, args.model, args.side == "ours-compiled")
        print(json.dumps(seconds))
        return seconds
    runs = {side: [] for side in args.sides}
    for pair in range(args.pairs):
        for side in args.sides:
            result = subprocess.run([sys.executable, __file__, "--side", side, "--epochs", str(args.epochs), "--model", args.model],
                                    capture_output=True, text=True, check=True)
            runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"round {pair} {side}: " + " ".join(f"{s:.2f}" for s in runs[side][-1]), flush=True)
    medians = {side: statistics.median(s for run in seconds for s in run[1:]) for side, seconds in runs.items()}
    lines = ["| side | s/epoch, median of counted epochs | each run's median | first epoch (each run) |", "|---|---|---|---|"]
    for side, seconds in runs.items():
        lines.append(f"| {side} | {medians[side]:.2f} | {', '.join(f'{statistics.median(run[1:]):.2f}' for run in seconds)} | "
                     f"{', '.join(f'{run[0]:.1f}' for run in seconds)} |")
    if "trl" in medians:
        lines += [f"\n{side} is {medians['trl'] / medians[side]:.2f} x as fast as TRL per epoch" for side in medians if side != "trl"]
    print("\n".join(lines))
    return runs


if __name__ == "__main__":
    main()

"""Seconds per epoch of this project's train.py and of TRL's DDPOTrainer, same model, same settings.

    pip install trl==0.23.1                      # the last TRL with DDPO; only for this benchmark
    python benchmarks/vs_trl.py --pairs 3 --epochs 5
    python benchmarks/vs_trl.py --sides ours ours-s16-k1 ours-compiled trl trl-s64

Both sides run the bundled model with the `tiny` preset's learning settings: 64 samples an epoch,
20 DDIM steps, eta 1, guidance 3, LoRA rank 4 on the attention projections, DDPO_IS with 4 updates
of 16 samples an epoch on half of each trajectory's steps, lr 5e-3, clip range 8e-4, advantages
clipped to 5, per-prompt statistics (buffer 32, min count 16), the JPEG reward on the `shapes`
prompts, fp32. Each run is its own process (a fresh interpreter, the machine's threads), and the
sides take turns: ours, TRL, ours, TRL... An epoch's time is the wall clock from the start of its
sampling to the start of the next (the last: to the end of its update), everything included: for
ours also the logging and the checkpoint it writes every epoch. The first epoch of each run warms
up and is not counted; the table gives each side's per-epoch median over all its counted epochs,
the medians of its two phases (sampling: rolling out and decoding the 64 samples; update: the
minibatch updates), every run's own median, and the speed against TRL's fastest side. What is
left of an epoch beyond the two phases is the side's own: rewards and advantages on both, logging
and checkpoints on ours.

Speed-only knobs, in a side's name: -s<N>, samples a forward in sampling (ours:
--sample-batch-size, TRL: sample_batch_size; 64, 32 or 16 here), and, ours only, -k<K>, trained
steps of each sample a forward (--steps-per-forward). TRL trains one timestep of a minibatch's 16
samples a forward, the most its update of 16 samples allows. `ours` is the plain command (the
preset's -s64 -k5); `ours-compiled` adds --compile, whose first epoch holds the compiling.

With --keep FILE --page PAGE it keeps the runs' seconds, with the commit and machine, and writes the
table into the page; --report writes the page again from the kept file, measuring nothing.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from page import measured_or_kept, provenance, write_table  # noqa: E402

# our sides: train.py with these flags; a side's name may end in -s<N> (N samples a forward in
# sampling: --sample-batch-size, TRL's sample_batch_size) and, ours only, -k<K> (K trained steps of
# each sample a forward: --steps-per-forward)
OURS = {
    "ours": [],
    "ours-compiled": ["--compile"],
}
KNOBS = {"s": "--sample-batch-size", "k": "--steps-per-forward"}


def side_knobs(side):
    """A side's name -> its base (ours, ours-compiled or trl) and its knobs {flag: value}."""
    base, *suffixes = side.split("-")
    if base == "ours" and suffixes[:1] == ["compiled"]:
        base, suffixes = "ours-compiled", suffixes[1:]
    knobs = {}
    for suffix in suffixes:
        letter, value = suffix[:1], suffix[1:]
        if letter not in KNOBS or not value.isdigit() or (base == "trl" and letter == "k"):
            raise argparse.ArgumentTypeError(
                f"side {side!r}: ours, ours-compiled or trl, then -s<N> and (ours) -k<K>"
            )
        if KNOBS[letter] in knobs:
            raise argparse.ArgumentTypeError(f"side {side!r}: -{letter} given twice")
        knobs[KNOBS[letter]] = int(value)
    if base not in (*OURS, "trl"):
        raise argparse.ArgumentTypeError(f"side {side!r}: ours, ours-compiled or trl first")
    return base, knobs


def side_name(side):
    side_knobs(side)
    return side


SETTINGS = dict(
    num_steps=20,
    guidance_scale=3.0,
    samples=64,
    batch_size=16,
    updates=4,
    timestep_fraction=0.5,
    lr=5e-3,
    clip_range=8e-4,
)
REDUCED = dict(
    num_steps=2, samples=8, batch_size=2
)  # --reduced, for the smoke test: both sides smaller, nothing timed worth reading


def run_ours(epochs, model, flags=(), settings=SETTINGS, seed=0):
    """train.main on the tiny preset (whose settings are SETTINGS; its size from settings): each
    epoch's seconds, and its sampling and update phases' (train.py's own sample_seconds and train_seconds)."""
    import train

    starts, sample_trajectories = [], train.sample_trajectories

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return sample_trajectories(*args, **kwargs)

    train.sample_trajectories = timed
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        history = train.main(
            [
                "--model",
                model,
                "--preset",
                "tiny",
                "--reward",
                "jpeg",
                "--epochs",
                str(epochs),
                "--out",
                f"{tmp}/run",
                "--seed",
                str(seed),
                "--num-steps",
                str(settings["num_steps"]),
                "--samples-per-epoch",
                str(settings["samples"]),
                "--batch-size",
                str(settings["batch_size"]),
                *flags,
            ]
        )
        starts.append(time.perf_counter())
    return {
        "epoch": list(np.diff(starts)),
        "sampling": [m["sample_seconds"] for m in history],
        "update": [m["train_seconds"] for m in history],
    }


def run_trl(epochs, model, settings=SETTINGS, sample_batch_size=None, seed=0):
    """TRL's DDPOTrainer.step, once an epoch, at settings: each epoch's seconds, and its sampling
    and update phases' (the trainer's _generate_samples and _train_batched_samples, timed).
    sample_batch_size: samples a forward in sampling (default settings' batch_size)."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    import toy_world
    from rewards import jpeg_compressibility

    rng = np.random.default_rng(seed)
    sample_batch_size = sample_batch_size or settings["batch_size"]
    if settings["samples"] % sample_batch_size:  # TRL would sample fewer and train on fewer
        raise SystemExit(f"trl-s{sample_batch_size}: must divide the {settings['samples']} samples")
    PartialState()  # the pipeline logs (no LoRA in the folder) through accelerate, which needs its state first
    with tempfile.TemporaryDirectory() as tmp:
        config = DDPOConfig(
            num_epochs=epochs,
            seed=seed,
            logdir=tmp,
            save_freq=10**9,
            mixed_precision="no",
            log_with=None,
            sample_num_steps=settings["num_steps"],
            sample_eta=1.0,
            sample_guidance_scale=settings["guidance_scale"],
            sample_batch_size=sample_batch_size,
            sample_num_batches_per_epoch=settings["samples"] // sample_batch_size,
            train_batch_size=settings["samples"] // settings["updates"],
            train_gradient_accumulation_steps=1,
            train_learning_rate=settings["lr"],
            train_adam_weight_decay=1e-4,
            train_clip_range=settings["clip_range"],
            train_adv_clip_max=5.0,
            train_timestep_fraction=settings["timestep_fraction"],
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=32,
            per_prompt_stat_tracking_min_count=16,
        )
        trainer = DDPOTrainer(
            config,
            lambda images, prompts, metadata: (jpeg_compressibility(images, prompts), {}),
            lambda: (toy_world.PROMPTS[rng.integers(len(toy_world.PROMPTS))], {}),
            DefaultDDPOStableDiffusionPipeline(model, use_lora=True),
        )
        seconds, spent = {"epoch": [], "sampling": [], "update": []}, {}

        def timed(phase, method):
            def call(*args, **kwargs):
                start = time.perf_counter()
                result = method(*args, **kwargs)
                spent[phase] += time.perf_counter() - start
                return result

            return call

        trainer._generate_samples = timed("sampling", trainer._generate_samples)
        trainer._train_batched_samples = timed(
            "update", trainer._train_batched_samples
        )  # once per inner epoch
        global_step = 0
        for epoch in range(epochs):
            spent.update(sampling=0.0, update=0.0)
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds["epoch"].append(time.perf_counter() - start)
            for phase, value in spent.items():
                seconds[phase].append(value)
    return seconds


def main(argv=None):
    from machinery.config import BUNDLED_MODEL

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3, help="rounds of the sides taking turns")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs a run; the first is not counted"
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "trl"],
        type=side_name,
        help="ours, ours-compiled or trl, each with -s<N> (samples a forward in sampling) and, "
        "ours, -k<K> (trained steps a forward): ours-s16-k1, trl-s64",
    )
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed")
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument(
        "--reduced", action="store_true", help=f"both sides at {REDUCED} (the smoke test)"
    )
    parser.add_argument("--keep", type=Path, help="a JSON file to keep the runs' seconds in")
    parser.add_argument("--page", type=Path, help="write the table into this page (with --keep)")
    parser.add_argument(
        "--report", action="store_true", help="the page from --keep, measuring nothing"
    )
    parser.add_argument(
        "--side", help=argparse.SUPPRESS
    )  # one run, in this process: what the rounds start
    args = parser.parse_args(argv)
    if (args.page or args.report) and not args.keep:
        parser.error("--page and --report read the kept results: give --keep too")
    settings = {**SETTINGS, **(REDUCED if args.reduced else {})}
    if args.side:
        base, knobs = side_knobs(args.side)
        if base == "trl":
            sample_batch_size = knobs.get(KNOBS["s"])
            seconds = run_trl(args.epochs, args.model, settings, sample_batch_size, args.seed)
        else:
            flags = [*OURS[base], *(str(x) for item in knobs.items() for x in item)]
            seconds = run_ours(args.epochs, args.model, flags, settings, args.seed)
        print(json.dumps(seconds))
        return seconds
    results = measured_or_kept(args.report, args.keep, lambda: measure(args))
    if args.page:
        write_table(args.page, args.keep.stem, table, results)  # its block named for the file
    return results["runs"]


def measure(args):
    """The sides' runs, taking turns, each a process of its own: their seconds, the command and
    its provenance."""
    runs, record = {side: [] for side in args.sides}, provenance()
    for pair in range(args.pairs):
        for side in args.sides:
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--epochs",
                    str(args.epochs),
                    "--model",
                    args.model,
                    "--seed",
                    str(args.seed),
                    *(["--reduced"] if args.reduced else []),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(
                f"round {pair} {side}: " + " ".join(f"{s:.2f}" for s in runs[side][-1]["epoch"]),
                flush=True,
            )

    print(table(runs))
    command = f"python benchmarks/vs_trl.py --pairs {args.pairs} --epochs {args.epochs} "
    command += f"--seed {args.seed} --sides "
    return {"runs": runs, "command": command + " ".join(args.sides), **record}


def table(runs):
    """Each side's seconds an epoch (the median of every run's counted epochs), its phases', each
    run's median, each run's first epoch, and its speed against TRL's fastest side."""

    def median(side, phase):  # over every run's counted epochs
        return statistics.median(s for run in runs[side] for s in run[phase][1:])

    medians = {side: median(side, "epoch") for side in runs}
    trl = min((m for side, m in medians.items() if side.startswith("trl")), default=None)
    lines = [
        "| side | s/epoch, median of counted epochs | sampling | update | each run's median | first epoch (each run) | speed / TRL's |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, seconds in runs.items():
        each = ", ".join(f"{statistics.median(run['epoch'][1:]):.2f}" for run in seconds)
        first = ", ".join(f"{run['epoch'][0]:.2f}" for run in seconds)
        speed = f"{trl / medians[side]:.2f}" if trl else "-"
        lines.append(
            f"| {side} | {medians[side]:.2f} | {median(side, 'sampling'):.2f} | {median(side, 'update'):.2f} | {each} | {first} | {speed} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

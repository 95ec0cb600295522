"""The CPU demo, measured: `python train.py --reward jpeg` on several seeds, with the bundled model.

    python benchmarks/cpu_demo.py --seeds 0 1 2 --out runs/cpu-demo
    python benchmarks/cpu_demo.py --model toy_world/tiny-flow --out runs/flow-demo \
        --keep docs/flow-demo --page docs/flow-models.md          # the bundled flow model

For each seed it runs the plain command (only --seed and --out added) in its own process, timing
the whole wall clock, and records it with the commit and the machine (run.json). It reads the run's
metrics.jsonl (a finished run in --out is read again, not run again): the mean JPEG size of the
first epoch and of the last LAST epochs together (the last epoch's 64 samples alone move by a few
points of cut from one machine's rounding to another's), the cut between them and the last epoch's
own cut, the fidelity of the first epoch and of the last LAST and the share kept, and the wall
time; then the median over seeds. It draws before_after.png: the base model and the first seed's
fine-tuned model, sampling the same prompts from the same noise. It keeps each run's result files
and the figures in --keep (docs/cpu-demo) and writes the table into --page (docs/cpu-demo.md);
`--out docs/cpu-demo` writes the page again from the kept files, measuring nothing.

    python benchmarks/cpu_demo.py --seeds 3 4 5 --out runs/s16k1 --keep docs/cpu-demo/s16k1 \
        --block cpu_demo_s16k1 --no-figures --train-args="--sample-batch-size 16 --steps-per-forward 1"

runs the command with more flags (--train-args), into a block of the page of its own (--block),
drawing and keeping no figures (--no-figures).

    python benchmarks/cpu_demo.py --model toy_world/tiny-words --reward ocr --out runs/words-demo \
        --keep docs/learns-to-write --page docs/learns-to-write.md      # the model that writes

runs `--reward ocr` instead: the table has the OCR reward, the share of words read exactly and the
share of images in the asked colour (toy_world.words.colour_fidelity). Then the base model and each
seed's tuned one sample the same noise, N_SAME per prompt on all 48 prompts: the same three
measures, and the diversity, the mean RMS distance between two samples of a prompt (same_noise.json
in each kept run, the base's in the kept folder).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import toy_world  # noqa: E402
from machinery.config import BUNDLED_MODEL, PRESETS  # noqa: E402
from machinery.learned_rewards import ocr  # noqa: E402
from machinery.pipeline import load_pipeline  # noqa: E402
from machinery.epoch_log import save_grid  # noqa: E402
from page import keep_run, made_by, provenance, write_block  # noqa: E402
from rewards import jpeg_kilobytes  # noqa: E402
from sampler import sample_trajectories  # noqa: E402
from toy_world import words  # noqa: E402

LAST = 5  # the epochs at the end whose mean is the result
N_SAME = 4  # samples a prompt from the same noise, base and tuned (--reward ocr)


def run_seed(seed, out, model=None, train_args=(), reward="jpeg"):
    if not (out / "run.json").is_file():  # else a finished run: read it again
        shutil.rmtree(out, ignore_errors=True)  # train.py writes only into an empty folder
        record, start = provenance(), time.time()  # the commit the run starts from
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "--reward",
                reward,
                "--seed",
                str(seed),
                "--out",
                str(out),
                *(["--model", str(model)] if model else []),
                *train_args,
            ],
            check=True,
        )
        record["wall_seconds"] = round(time.time() - start, 1)
        (out / "run.json").write_text(json.dumps(record) + "\n")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if "reward_mean" in m]  # not an evaluation's row of its own
    first, tail = epochs[0], epochs[-LAST:]
    tail_fidelity = statistics.mean(m["fidelity"] for m in tail)
    return {
        "seed": seed,
        **SUMMARIES[reward](first, epochs[-1], tail),
        "first_fidelity": first["fidelity"],
        "last5_fidelity": tail_fidelity,
        "kept_last5": tail_fidelity / first["fidelity"],
        **json.loads((out / "run.json").read_text()),
    }


def jpeg_summary(first, last, tail):
    """A JPEG run: the mean size, first epoch and last LAST, and the cuts."""
    tail_kb = statistics.mean(-m["reward_mean"] for m in tail)
    return {
        "first_kb": -first["reward_mean"],
        "last5_kb": tail_kb,
        "cut_last5": 1 + tail_kb / first["reward_mean"],
        "cut_last": 1 - last["reward_mean"] / first["reward_mean"],
    }


def ocr_summary(first, last, tail):
    """An OCR run: the mean reward and the share of words read exactly, first epoch and last LAST."""
    tail_exact = statistics.mean(m["reward_exact"] for m in tail)
    return {
        "first_ocr": first["reward_mean"],
        "last5_ocr": statistics.mean(m["reward_mean"] for m in tail),
        "first_exact": first["reward_exact"],
        "last5_exact": tail_exact,
        "gain_exact": 100 * (tail_exact - first["reward_exact"]),
    }


SUMMARIES = {"jpeg": jpeg_summary, "ocr": ocr_summary}


def sample(pipe, prompts, seed=0):
    """The preset's sampling of prompts, from noise drawn by seed."""
    preset = PRESETS["tiny"]
    return sample_trajectories(
        pipe,
        prompts,
        preset["num_steps"],
        preset["guidance_scale"],
        generator=torch.Generator().manual_seed(seed),
        policy=pipe.family.POLICY,
    )["images"]


@torch.no_grad()
def same_noise(pipe, read):
    """Exact share, OCR reward, colour fidelity and diversity of N_SAME samples of each prompt."""
    prompts = [p for p in words.PROMPTS for _ in range(N_SAME)]
    images = sample(pipe, prompts)
    scores = read(images, prompts)
    groups = images.double().reshape(len(words.PROMPTS), N_SAME, -1)
    distances = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5  # RMS, [0, 1] units
    pairs = N_SAME * (N_SAME - 1)
    return {
        "exact": (scores == 1).double().mean().item(),
        "ocr": scores.double().mean().item(),
        "fidelity": words.colour_fidelity(images, prompts).double().mean().item(),
        "diversity": (distances.sum(dim=(1, 2)) / pairs).mean().item(),
    }


@torch.no_grad()
def before_after(lora_dir, path, model, reward, n=8):
    """Base and fine-tuned model on the same prompts and the same initial noise, one row each."""
    prompts = (words.PROMPTS[::6] if reward == "ocr" else toy_world.PROMPTS[::2])[:n]
    pipe = load_pipeline(model)
    base = sample(pipe, prompts)
    pipe.load_lora_weights(lora_dir)
    images = torch.cat([base, sample(pipe, prompts)])
    rows = ["base"] * len(prompts) + ["tuned"] * len(prompts)
    if reward == "ocr":
        read = ocr.load()
        scores, readings = read(images, prompts * 2).tolist(), read.readings
        fidelity = words.colour_fidelity(images, prompts * 2).tolist()
        captions = [
            f"{row} read {text!r}\n{p.split()[-1]} {r:.2f} {f:.0f}"
            for row, text, p, r, f in zip(rows, readings, prompts * 2, scores, fidelity)
        ]
    else:
        kilobytes = jpeg_kilobytes(images).tolist()
        fidelity = toy_world.judge(images, prompts * 2).tolist()
        captions = [
            f"{row} {kb:.2f} kB\n{p[2:]} {f:.1f}"
            for row, p, kb, f in zip(rows, prompts * 2, kilobytes, fidelity)
        ]
    save_grid(images, captions, path, cols=len(prompts))


def same_noise_all(args, runs):
    """same_noise of the base model (kept as base_same_noise.json) and of each seed's LoRA, each
    measured once (a kept file is read again), as the page's table."""
    models = [("base", args.keep / "base_same_noise.json", None)]
    models += [(f"seed {seed}", out / "same_noise.json", out / "lora") for seed, out in runs]
    read, pipe = ocr.load(), None
    for _, path, lora in models:
        if path.is_file():
            continue
        pipe = pipe or load_pipeline(args.model)
        pipe.unload_lora_weights()
        if lora:
            pipe.load_lora_weights(lora)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(same_noise(pipe, read)) + "\n")
    measured = [(name, json.loads(path.read_text())) for name, path, _ in models]
    base = measured[0][1]
    rows = ["| model | exact | OCR reward | colour | diversity |", "|---|---|---|---|---|"]
    for name, m in measured:
        rows.append(
            f"| {name} | {m['exact']:.3f} | {m['ocr']:.3f} | {m['fidelity']:.3f} "
            f"| {m['diversity']:.4f} ({m['diversity'] / base['diversity']:.2f} of the base's) |"
        )
    return "\n".join(rows)


def medians(results, columns):
    """Each column's median over the seeds."""
    return {k: statistics.median(r[k] for r in results) for k in columns}


def table(results, reward="jpeg"):
    """The page's table: one row a seed, then the median."""
    columns = {**COLUMNS[reward], **FIDELITY}
    rows = [(str(r["seed"]), r) for r in results]
    rows.append(("median", medians(results, columns)))
    lines = ["| seed | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows:
        cells = [FORMATS.get(k, "{:.3f}").format(r[k]) for k in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = {
    "jpeg": {
        "first_kb": "first epoch kB",
        "last5_kb": f"last {LAST} epochs kB",
        "cut_last5": f"cut, last {LAST}",
        "cut_last": "cut, last epoch",
    },
    "ocr": {
        "first_exact": "first epoch exact",
        "last5_exact": f"last {LAST} exact",
        "gain_exact": "gain, points",
        "first_ocr": "first OCR reward",
        "last5_ocr": f"last {LAST} OCR reward",
    },
}
FIDELITY = {
    "first_fidelity": "first fidelity",
    "last5_fidelity": f"last {LAST} fidelity",
    "kept_last5": "kept",
    "wall_seconds": "wall s",
}
FORMATS = {
    "cut_last5": "{:.1%}",
    "cut_last": "{:.1%}",
    "gain_exact": "{:+.1f}",
    "kept_last5": "{:.2f}",
    "wall_seconds": "{:.0f}",
}


def keep(args, results):
    """Each run's result files and the figures into args.keep (small: no weights, no samples)."""
    first = args.out / f"seed{args.seeds[0]}"
    last = sorted((first / "samples").glob("epoch_*.png"))
    figures = {
        "reward_curve.png": first / "reward_curve.png",
        "first_epoch.png": last[0] if last else None,
        "last_epoch.png": last[-1] if last else None,
        "before_after.png": args.out / "before_after.png",
    }
    for seed in args.seeds:
        keep_run(args.out / f"seed{seed}", args.keep / f"seed{seed}", also=("same_noise.json",))
    if args.no_figures:
        return
    for name, path in figures.items():
        if path is not None and path.is_file():
            shutil.copyfile(path, args.keep / name)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--model", type=Path, help="a bundled model other than the DDIM one (its preset)"
    )
    parser.add_argument("--reward", default="jpeg", choices=tuple(COLUMNS))
    parser.add_argument("--out", type=Path, default=Path("runs/cpu-demo"))
    parser.add_argument("--keep", type=Path, default=ROOT / "docs" / "cpu-demo")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "cpu-demo.md")
    parser.add_argument("--train-args", default="", help="more train.py flags, in one string")
    parser.add_argument("--block", default="cpu_demo", help="the page's block to write")
    parser.add_argument(
        "--no-figures", action="store_true", help="the table only: no figures drawn or kept"
    )
    args = parser.parse_args()
    model = args.model or BUNDLED_MODEL
    train_args = args.train_args.split()
    runs = [(seed, args.out / f"seed{seed}") for seed in args.seeds]
    results = [run_seed(seed, out, args.model, train_args, args.reward) for seed, out in runs]
    body = table(results, args.reward)
    if args.reward == "ocr":
        body += "\n\nFrom the same noise:\n\n" + same_noise_all(args, runs)
    print(body)
    lora = args.out / f"seed{args.seeds[0]}" / "lora"
    if lora.is_dir() and not args.no_figures:  # kept results have no weights: the figure stays
        before_after(lora, args.out / "before_after.png", model, args.reward)
    if args.out.resolve() != args.keep.resolve():
        keep(args, results)
    seeds = " ".join(str(seed) for seed in args.seeds)
    flags = f" --model {args.model}" if args.model else ""
    flags += f" --reward {args.reward}" if args.reward != "jpeg" else ""
    given = f' --train-args="{args.train_args}"' if args.train_args else ""
    command = f"python benchmarks/cpu_demo.py{flags} --seeds {seeds}{given}"
    write_block(args.page, args.block, body + "\n\n" + made_by(command, results))


if __name__ == "__main__":
    main()

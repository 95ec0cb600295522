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
from machinery.pipeline import load_pipeline  # noqa: E402
from machinery.epoch_log import save_grid  # noqa: E402
from page import keep_run, made_by, provenance, write_block  # noqa: E402
from rewards import jpeg_kilobytes  # noqa: E402
from sampler import sample_trajectories  # noqa: E402

LAST = 5  # the epochs at the end whose mean is the result


def run_seed(seed, out, model=None, train_args=()):
    if not (out / "run.json").is_file():  # else a finished run: read it again
        shutil.rmtree(out, ignore_errors=True)  # train.py writes only into an empty folder
        record, start = provenance(), time.time()  # the commit the run starts from
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "--reward",
                "jpeg",
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
    first, last, tail = epochs[0], epochs[-1], epochs[-LAST:]
    tail_kb = statistics.mean(-m["reward_mean"] for m in tail)
    tail_fidelity = statistics.mean(m["fidelity"] for m in tail)
    return {
        "seed": seed,
        "first_kb": -first["reward_mean"],
        "last5_kb": tail_kb,
        "cut_last5": 1 + tail_kb / first["reward_mean"],
        "cut_last": 1 - last["reward_mean"] / first["reward_mean"],
        "first_fidelity": first["fidelity"],
        "last5_fidelity": tail_fidelity,
        "kept_last5": tail_fidelity / first["fidelity"],
        **json.loads((out / "run.json").read_text()),
    }


@torch.no_grad()
def before_after(lora_dir, path, model, n=8):
    """Base and fine-tuned model on the same prompts and the same initial noise, one row each."""
    preset = PRESETS["tiny"]
    prompts = toy_world.PROMPTS[::2][:n]
    pipe = load_pipeline(model)
    rows = []
    for tuned in (False, True):
        if tuned:
            pipe.load_lora_weights(lora_dir)
        traj = sample_trajectories(
            pipe,
            prompts,
            preset["num_steps"],
            preset["guidance_scale"],
            generator=torch.Generator().manual_seed(0),
            policy=pipe.family.POLICY,
        )
        rows.append(traj["images"])
    images = torch.cat(rows)
    fidelity = toy_world.judge(images, prompts * 2).tolist()
    captions = [
        f"{'tuned' if k >= n else 'base'} {kb:.2f} kB\n{p[2:]} {f:.1f}"
        for k, (p, kb, f) in enumerate(zip(prompts * 2, jpeg_kilobytes(images).tolist(), fidelity))
    ]
    save_grid(images, captions, path, cols=n)


def medians(results):
    """Each column's median over the seeds."""
    return {k: statistics.median(r[k] for r in results) for k in COLUMNS}


def table(results):
    """The page's table: one row a seed, then the median."""
    rows = [(str(r["seed"]), r) for r in results]
    rows.append(("median", medians(results)))
    lines = ["| seed | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows:
        cells = [FORMATS.get(k, "{:.3f}").format(r[k]) for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = {
    "first_kb": "first epoch kB",
    "last5_kb": f"last {LAST} epochs kB",
    "cut_last5": f"cut, last {LAST}",
    "cut_last": "cut, last epoch",
    "first_fidelity": "first fidelity",
    "last5_fidelity": f"last {LAST} fidelity",
    "kept_last5": "kept",
    "wall_seconds": "wall s",
}
FORMATS = {
    "cut_last5": "{:.1%}",
    "cut_last": "{:.1%}",
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
        keep_run(args.out / f"seed{seed}", args.keep / f"seed{seed}")
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
        "--model", type=Path, help="a bundled model other than the DDIM one (tiny preset)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/cpu-demo"))
    parser.add_argument("--keep", type=Path, default=ROOT / "docs" / "cpu-demo")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "cpu-demo.md")
    parser.add_argument("--train-args", default="", help="more train.py flags, in one string")
    parser.add_argument("--block", default="cpu_demo", help="the page's block to write")
    parser.add_argument(
        "--no-figures", action="store_true", help="the table only: no figures drawn or kept"
    )
    args = parser.parse_args()
    train_args = args.train_args.split()
    runs = [(seed, args.out / f"seed{seed}") for seed in args.seeds]
    results = [run_seed(seed, out, args.model, train_args) for seed, out in runs]
    print(table(results))
    lora = args.out / f"seed{args.seeds[0]}" / "lora"
    if lora.is_dir() and not args.no_figures:  # kept results have no weights: the figure stays
        before_after(lora, args.out / "before_after.png", args.model or BUNDLED_MODEL)
    if args.out.resolve() != args.keep.resolve():
        keep(args, results)
    seeds = " ".join(str(seed) for seed in args.seeds)
    model = f" --model {args.model}" if args.model else ""
    given = f' --train-args="{args.train_args}"' if args.train_args else ""
    command = f"python benchmarks/cpu_demo.py{model} --seeds {seeds}{given}"
    write_block(args.page, args.block, table(results) + "\n\n" + made_by(command, results))


if __name__ == "__main__":
    main()

"""The CPU demo, measured: `python train.py --reward jpeg` on several seeds, with the bundled model.

    python benchmarks/cpu_demo.py --seeds 0 1 2 --out runs/cpu-demo

For each seed it runs the plain command (only --seed and --out added) in its own process, timing
the whole wall clock, and reads the run's metrics.jsonl (a finished run in --out is read again, not
run again). It prints and writes (results.md) the mean JPEG size of the first epoch and of the
last LAST epochs together (the last epoch's 64 samples alone move by a few points of cut from one
machine's rounding to another's), the cut between them and the last epoch's own cut, the fidelity
of the first epoch and of the last LAST and the share kept, and the wall time; then the median and
spread over seeds. It also draws before_after.png: the base model and the first seed's
fine-tuned model, sampling the same prompts from the same noise.
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
from rewards import jpeg_kilobytes  # noqa: E402
from machinery.pipeline import load_pipeline  # noqa: E402
from sampler import sample_trajectories  # noqa: E402
from machinery.run_folder import save_grid  # noqa: E402
from machinery.config import BUNDLED_MODEL, PRESETS  # noqa: E402

LAST = 5  # the epochs at the end whose mean is the result


def run_seed(seed, out):
    if not (out / "wall_seconds.txt").is_file():  # else a finished run: read it again
        shutil.rmtree(
            out, ignore_errors=True
        )  # an unfinished one starts again (train.py writes only into an empty folder)
        start = time.time()
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
            ],
            check=True,
        )
        (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
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
        "wall_seconds": float((out / "wall_seconds.txt").read_text()),
    }


@torch.no_grad()
def before_after(lora_dir, path, n=8):
    """Base and fine-tuned model on the same prompts and the same initial noise, one row each."""
    preset = PRESETS["tiny"]
    prompts = toy_world.PROMPTS[::2][:n]
    pipe = load_pipeline(BUNDLED_MODEL)
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
        )
        rows.append(traj["images"])
    images = torch.cat(rows)
    fidelity = toy_world.judge(images, prompts * 2).tolist()
    captions = [
        f"{'tuned' if k >= n else 'base'} {kb:.2f} kB\n{p[2:]} {f:.1f}"
        for k, (p, kb, f) in enumerate(zip(prompts * 2, jpeg_kilobytes(images).tolist(), fidelity))
    ]
    save_grid(images, captions, path, cols=n)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/cpu-demo"))
    args = parser.parse_args()
    results = [run_seed(seed, args.out / f"seed{seed}") for seed in args.seeds]
    keys = [
        "first_kb",
        "last5_kb",
        "cut_last5",
        "cut_last",
        "first_fidelity",
        "last5_fidelity",
        "kept_last5",
        "wall_seconds",
    ]
    lines = ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in results]
    summary = {k: [r[k] for r in results] for k in keys}
    lines.append(
        "| median | " + " | ".join(f"{statistics.median(v):.3f}" for v in summary.values()) + " |"
    )
    lines.append(
        "| min-max | " + " | ".join(f"{min(v):.3f}-{max(v):.3f}" for v in summary.values()) + " |"
    )
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    before_after(args.out / f"seed{args.seeds[0]}" / "lora", args.out / "before_after.png")


if __name__ == "__main__":
    main()

"""DDPO_IS, DDPO_SF, RWR, sparse RWR and PXPO on the bundled model, on equal budgets of reward
queries and several seeds.

    python benchmarks/compare.py --seeds 0 1 2 --epochs 15 --out runs/compare

Two comparisons: ddpo-is / ddpo-sf / rwr / rwr-sparse on `jpeg` (the paper's figure), and ddpo-is /
ddpo-sf / pxpo on `pixel_color` (PXPO's claim). Every run is
`train.py --algo A --reward R --seed S --epochs E` (called in this process, one after another) with
the preset for the bundled model and nothing else changed, so every algorithm gets the same
samples per epoch, the same optimiser and learning rate, and the same reward queries. A run whose
metrics.jsonl already has every epoch is reused, so an interrupted sweep picks up where it stopped.
Writes compare.md (the table) and compare.png (reward and fidelity against reward queries: mean
over seeds, shaded from the lowest to the highest seed) into --out.
"""
import argparse
import contextlib
import io
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402

# On pixel_color ddpo-sf is PXPO's control: with a flat reward map PXPO is DDPO_SF, so the two differ
# only in the per-pixel credit, while ddpo-is also differs in its 4 clipped updates per epoch.
COMPARISONS = {"jpeg": ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"), "pixel_color": ("ddpo-is", "ddpo-sf", "pxpo")}


def run(algo, reward, seed, epochs, out, extra):
    """One training run (or the finished one already in out); its metrics and wall time."""
    metrics_file = out / "metrics.jsonl"
    done = metrics_file.is_file() and len(metrics_file.read_text().splitlines()) == epochs
    if not done:
        if out.exists():  # an unfinished run: start it again (train.py refuses to write over a run)
            shutil.rmtree(out)
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # keep the console for the results
            train.main(["--algo", algo, "--reward", reward, "--seed", str(seed), "--epochs", str(epochs), "--out", str(out), *extra])
        (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return metrics, float((out / "wall_seconds.txt").read_text())


def summarise(runs):
    """Markdown rows: first and last epoch's reward (median and range over seeds), fidelity, time."""
    rows = ["| reward | algorithm | seeds | first epoch | last epoch (median) | last epoch (min-max) | last fidelity (median) | wall s / run |",
            "|---|---|---|---|---|---|---|---|"]
    for (reward, algo), seeds in runs.items():
        first = statistics.median(m[0]["reward_mean"] for m, _ in seeds)
        last = [m[-1]["reward_mean"] for m, _ in seeds]
        fidelity = [m[-1]["fidelity"] for m, _ in seeds if "fidelity" in m[-1]]
        fidelity = f"{statistics.median(fidelity):.3f}" if fidelity else "-"
        wall = statistics.median(w for _, w in seeds)
        rows.append(f"| {reward} | {algo} | {len(seeds)} | {first:.3f} | {statistics.median(last):.3f} | "
                    f"{min(last):.3f} to {max(last):.3f} | {fidelity} | {wall:.0f} |")
    return "\n".join(rows)


def plot(runs, path):
    """Top row: mean reward against reward queries; bottom row: the toy world's fidelity."""
    rewards = list(dict.fromkeys(reward for reward, _ in runs))
    fig, axes = plt.subplots(2, len(rewards), figsize=(5 * len(rewards), 7), squeeze=False)
    for column, reward in enumerate(rewards):
        for (run_reward, algo), seeds in runs.items():
            if run_reward != reward:
                continue
            queries = [m["reward_queries"] for m in seeds[0][0]]
            for row, key in enumerate(("reward_mean", "fidelity")):
                curves = np.array([[m.get(key, np.nan) for m in metrics] for metrics, _ in seeds])
                axes[row, column].plot(queries, curves.mean(axis=0), label=algo)
                axes[row, column].fill_between(queries, curves.min(axis=0), curves.max(axis=0), alpha=0.2)
        axes[0, column].set(ylabel=f"mean reward ({reward})", title=f"{reward}: mean over seeds, min to max shaded")
        axes[1, column].set(xlabel="reward queries", ylabel="fidelity (toy_world.judge)")
        for ax in axes[:, column]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run: the budget is epochs x samples per epoch")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--train-args", default="", help="more train.py flags for every run, quoted (e.g. a smaller --model)")
    parser.add_argument("--algos", nargs="+", help="only these algorithms (default: every one in the comparisons)")
    args = parser.parse_args(argv)
    extra = shlex.split(args.train_args)
    runs = {}
    for reward, algos in COMPARISONS.items():
        for algo in (a for a in algos if not args.algos or a in args.algos):
            for seed in args.seeds:
                metrics, wall = run(algo, reward, seed, args.epochs, args.out / f"{reward}-{algo}-seed{seed}", extra)
                runs.setdefault((reward, algo), []).append((metrics, wall))
                print(f"{reward} {algo} seed {seed}: reward {metrics[0]['reward_mean']:.3f} -> {metrics[-1]['reward_mean']:.3f} ({wall:.0f} s)", flush=True)
    table = summarise(runs)
    print(table)
    (args.out / "compare.md").write_text(table + "\n")
    plot(runs, args.out / "compare.png")
    return runs


if __name__ == "__main__":
    main()

"""DDPO_IS, DDPO_SF, RWR, sparse RWR, PXPO and AWM on the bundled model: each tuned on its own,
then compared on seeds the tuning never saw, on equal budgets of reward queries.

    python benchmarks/compare.py --out runs/compare --jobs 2                 # both stages
    python benchmarks/compare.py --out runs/compare --stage tune --jobs 2    # only the tuning
    python benchmarks/compare.py --out runs/compare --stage final --jobs 2   # only the 3 seeds

Two comparisons: ddpo-is / ddpo-sf / rwr / rwr-sparse on `jpeg` (the paper's figure 4; and AWM,
beyond the paper), and
ddpo-is / ddpo-sf / pxpo / pxpo-position on `pixel_background` (PXPO's claim, on a reward map that
differs inside the image; pxpo-position is PXPO with --pxpo-normalise position). Every run is `train.py --algo A --reward R --seed S --epochs E` with the bundled model's
preset, so all get the same samples per epoch and the same reward queries.

1. tune: for each algorithm, every learning rate of LRS (and, for dense RWR, every beta of BETAS),
   one run on --tune-seed. The choice is the best last-epoch reward among the settings whose
   last-epoch fidelity keeps >= 0.8 x the first epoch's (the base model's); if none does, the one
   that keeps the most. Writes tune/tune.md (every setting, the choice marked) and tune/tune.json,
   merged with what an earlier tuning wrote, so one algorithm's grid can be widened on its own.
2. final: each algorithm at its choice on --seeds (not the tuning seed). Writes compare.md (the
   grid, the choice and the seeds' results) and compare.png (reward and fidelity against reward
   queries: mean over seeds, shaded from the lowest to the highest seed).

A finished run (its wall_seconds.txt written) is reused, so an interrupted sweep picks up where
it stopped. With --jobs N, N runs go at once, each its own single-threaded process. With --keep
docs/algorithms --page docs/algorithms.md the final stage keeps the tuning's and the runs' result
files (no weights) and writes both tables into the page; `--out docs/algorithms --stage final`
writes them again from the kept files.
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from page import keep_run, made_by, provenance, run_record, save_json, write_block  # noqa: E402

# On pixel_background ddpo-sf is PXPO's control: with a flat reward map PXPO is DDPO_SF, so the two
# differ only in the per-pixel credit, while ddpo-is also differs in its 4 clipped updates per epoch.
COMPARISONS = {
    "jpeg": ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse", "awm"),
    "pixel_background": ("ddpo-is", "ddpo-sf", "pxpo", "pxpo-position"),
}
# A variant is an algorithm run with more flags: PXPO with each latent position normalised by its own statistics
VARIANTS = {"pxpo-position": ["--algo", "pxpo", "--pxpo-normalise", "position"]}
LRS = (5e-4, 1.6e-3, 5e-3, 1.6e-2)  # log-spaced by sqrt(10), around the tiny preset's 5e-3
# On jpeg, the base model's rewards spread by about 0.7 kB (std): at these betas 90 % of the weight lies on 69 %,
# 56 % and 47 % of the first epoch's samples (weight_share; less selective than ddpo.rwr_weights' normal
# formula says, as the sizes fall in two clusters, plain and textured backgrounds); at the original's 0.2, on 88 %
BETAS = (1.5, 3.0, 6.0)
FIDELITY_KEPT = 0.8


def algo_flags(algo):
    return VARIANTS.get(algo, ["--algo", algo])


def grid(algo, lrs=LRS, betas=BETAS):
    return [
        {"lr": lr, **({"beta": beta} if algo == "rwr" else {})}
        for lr in lrs
        for beta in (betas if algo == "rwr" else (None,))
    ]


def name(setting):
    return "-".join(f"{key}{value:g}" for key, value in setting.items())


def flags(setting):
    return [item for key, value in setting.items() for item in (f"--{key}", f"{value:g}")]


def run(argv, out, epochs, jobs):
    """One training run (or the finished one already in out): its metrics and wall time. With
    jobs > 1 in a single-threaded process of its own, else in this process."""
    metrics_file = out / "metrics.jsonl"
    if not (out / "wall_seconds.txt").is_file():  # written once the run has finished
        if out.exists():  # an unfinished run: start it again (train.py refuses to write over a run)
            shutil.rmtree(out)
        record, start = provenance(), time.time()  # the commit the run starts from
        argv = [*argv, "--epochs", str(epochs), "--out", str(out)]
        if jobs > 1:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), *argv],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # keep the console for the results
                train.main(argv)
        (out / "run.json").write_text(json.dumps(record) + "\n")
        (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return metrics, float((out / "wall_seconds.txt").read_text())


def run_all(tasks, args):
    """tasks: {key: (argv, out)} -> {key: (metrics, wall)}, args.jobs at a time, each printed when done."""

    def one(key):
        argv, out = tasks[key]
        metrics, wall = run([*argv, *shlex.split(args.train_args)], out, args.epochs, args.jobs)
        epochs = [m for m in metrics if "reward_mean" in m]  # not the final evaluation's row
        first, last = epochs[0], epochs[-1]
        print(
            f"{out.name}: reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}, "
            f"fidelity {first.get('fidelity', float('nan')):.2f} -> {last.get('fidelity', float('nan')):.2f} ({wall:.0f} s)",
            flush=True,
        )
        return key, (metrics, wall)

    if args.jobs == 1:  # in the main thread: train.py's Ctrl-C handling needs it
        return dict(map(one, tasks))
    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(pool.map(one, tasks))


def kept(metrics):
    """The share of the base model's fidelity that the last epoch keeps (1 without a judge)."""
    first, last = metrics[0].get("fidelity"), metrics[-1].get("fidelity")
    return 1.0 if first is None else last / max(first, 1e-9)


def choose(results):
    """The best last reward among settings that keep the fidelity, else the setting that keeps the most."""
    fine = [s for s, (m, _) in results.items() if kept(m) >= FIDELITY_KEPT]
    if fine:
        return max(fine, key=lambda s: results[s][0][-1]["reward_mean"])
    return max(results, key=lambda s: kept(results[s][0]))


def tune(args, comparisons):
    """Every grid setting of every algorithm on the tuning seed; tune/tune.json keeps each
    algorithm's results and choice (merged with earlier ones, so a grid can be widened later)."""
    folder = args.out / "tune"
    path = folder / "tune.json"
    tuned = json.loads(path.read_text()) if path.is_file() else {}
    earlier = {  # an earlier tuning's settings stay in the grid (their finished runs are reused)
        (reward, algo): [row["setting"] for row in result["settings"]]
        for reward, algos in tuned.items()
        for algo, result in algos.items()
    }
    grids = {
        (reward, algo): {
            name(s): s
            for s in [*earlier.get((reward, algo), []), *grid(algo, args.lrs, args.betas)]
        }
        for reward, algos in comparisons.items()
        for algo in algos
    }
    tasks = {
        (reward, algo, key): (
            [*algo_flags(algo), "--reward", reward, "--seed", str(args.tune_seed), *flags(s)],
            folder / f"{reward}-{algo}-{key}",
        )
        for (reward, algo), settings in grids.items()
        for key, s in settings.items()
    }
    results = run_all(tasks, args)
    for (reward, algo), settings in grids.items():
        best = choose({key: results[(reward, algo, key)] for key in settings})
        tuned.setdefault(reward, {})[algo] = {
            "chosen": settings[best],
            "seed": args.tune_seed,
            "epochs": args.epochs,
            "settings": [
                {
                    "setting": s,
                    "first": results[(reward, algo, key)][0][0],
                    "last": results[(reward, algo, key)][0][-1],
                }
                for key, s in settings.items()
            ],
        }
    path.write_text(json.dumps(tuned, indent=1) + "\n")
    table = tuning_table(tuned)
    print(table)
    (folder / "tune.md").write_text(table + "\n")
    return tuned


def tuning_table(tuned):
    """Markdown: every setting tried, its first and last epoch, the fidelity it kept, the choice."""
    rows = [
        "| reward | algorithm | setting | first epoch | last epoch | fidelity first -> last (kept) | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for reward, algos in tuned.items():
        for algo, result in algos.items():
            for row in result["settings"]:
                first, last = row["first"], row["last"]
                kept_share = kept([first, last])
                fidelity = (
                    f"{first['fidelity']:.2f} -> {last['fidelity']:.2f} ({kept_share:.2f})"
                    if "fidelity" in first
                    else "-"
                )
                mark = "**yes**" if row["setting"] == result["chosen"] else ""
                rows.append(
                    f"| {reward} | {algo} | {name(row['setting'])} | {first['reward_mean']:.3f} | {last['reward_mean']:.3f} | {fidelity} | {mark} |"
                )
    return "\n".join(rows)


def final(args, comparisons):
    path = args.out / "tune" / "tune.json"
    if not path.is_file():
        sys.exit(f"compare.py: error: {path} not found: run the tuning first (--stage tune)")
    tuned = json.loads(path.read_text())
    missing = [
        f"{reward} {algo}"
        for reward, algos in comparisons.items()
        for algo in algos
        if algo not in tuned.get(reward, {})
    ]
    if missing:
        sys.exit(
            f"compare.py: error: {path} has no choice for {', '.join(missing)}: run --stage tune for it first"
        )
    chosen = {
        reward: {algo: result["chosen"] for algo, result in algos.items()}
        for reward, algos in tuned.items()
    }
    tasks = {
        (reward, algo, seed): (
            [
                *algo_flags(algo),
                "--reward",
                reward,
                "--seed",
                str(seed),
                *flags(chosen[reward][algo]),
            ],
            args.out / f"{reward}-{algo}-{name(chosen[reward][algo])}-seed{seed}",
        )
        for reward, algos in comparisons.items()
        for algo in algos
        for seed in args.seeds
    }
    results = run_all(tasks, args)
    runs = {}
    for (reward, algo, seed), result in results.items():
        runs.setdefault((reward, algo), []).append(result)
    table = summarise(runs, chosen)
    print(table)
    seeds = {result["seed"] for algos in tuned.values() for result in algos.values()}
    (args.out / "compare.md").write_text(
        f"Seeds {' '.join(map(str, args.seeds))}, {args.epochs} epochs a run.\n\n{table}\n\n"
        f"## The tuning (seed {', '.join(map(str, sorted(seeds)))})\n\n{tuning_table(tuned)}\n"
    )
    plot(runs, args.out / "compare.png")
    if args.page:
        keep(args, tasks, tuned, table)
    return runs


def keep(args, tasks, tuned, table):
    """The final runs' and the tuning's results into args.keep, the tables into args.page."""
    if args.out.resolve() != args.keep.resolve():
        for _, out in tasks.values():
            keep_run(out, args.keep / out.name)
        save_json(args.keep / "tune" / "tune.json", tuned)
        shutil.copyfile(args.out / "compare.png", args.keep / "compare.png")
    records = [run_record(args.keep / out.name) for _, out in tasks.values()]
    seeds = " ".join(map(str, args.seeds))
    command = f"python benchmarks/compare.py --jobs 2 --seeds {seeds}"
    figure = f"![reward and fidelity against reward queries, every algorithm at its tuned setting, 3 seeds]({args.keep.name}/compare.png)"
    tune_seeds = sorted({result["seed"] for algos in tuned.values() for result in algos.values()})
    tuning = f"The tuning, on seed {', '.join(map(str, tune_seeds))} (the first epoch is the base model on that seed):"
    body = (
        f"{table}\n\n{figure}\n\n{tuning}\n\n{tuning_table(tuned)}\n\n{made_by(command, records)}"
    )
    write_block(args.page, "compare", body)


def summarise(runs, chosen):
    """Markdown rows: first and last epoch's reward (median and range over seeds), fidelity kept, time."""
    rows = [
        "| reward | algorithm | chosen | seeds | first epoch | last epoch (median) | last epoch (min-max) | last fidelity (median) | "
        "fidelity kept (median) | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (reward, algo), seeds in runs.items():
        first = statistics.median(m[0]["reward_mean"] for m, _ in seeds)
        last = [m[-1]["reward_mean"] for m, _ in seeds]
        fidelity = [m[-1]["fidelity"] for m, _ in seeds if "fidelity" in m[-1]]
        fidelity = f"{statistics.median(fidelity):.3f}" if fidelity else "-"
        wall = statistics.median(w for _, w in seeds)
        rows.append(
            f"| {reward} | {algo} | {name(chosen[reward][algo])} | {len(seeds)} | {first:.3f} | {statistics.median(last):.3f} | "
            f"{min(last):.3f} to {max(last):.3f} | {fidelity} | {statistics.median(kept(m) for m, _ in seeds):.2f} | {wall:.0f} |"
        )
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
                axes[row, column].fill_between(
                    queries, curves.min(axis=0), curves.max(axis=0), alpha=0.2
                )
        axes[0, column].set(
            ylabel=f"mean reward ({reward})", title=f"{reward}: mean of seeds, range shaded"
        )
        axes[1, column].set(xlabel="reward queries", ylabel="fidelity (toy_world.judge)")
        for ax in axes[:, column]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("tune", "final", "all"), default="all")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="final stage's seeds"
    )
    parser.add_argument(
        "--tune-seed", type=int, default=100, help="the tuning's one seed, not among --seeds"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="epochs per run: the budget is epochs x samples per epoch",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--keep", type=Path, help="keep the final stage's results here")
    parser.add_argument("--page", type=Path, help="write the tables into this page (with --keep)")
    parser.add_argument(
        "--train-args",
        default="",
        help="more train.py flags for every run, quoted (e.g. a smaller --model)",
    )
    parser.add_argument(
        "--algos", nargs="+", help="only these algorithms (default: every one in the comparisons)"
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=LRS, help="the tuning's learning rates"
    )
    parser.add_argument(
        "--betas", type=float, nargs="+", default=BETAS, help="the tuning's betas for dense RWR"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each a single-threaded process (1: one after another, here)",
    )
    args = parser.parse_args(argv)
    if args.page and not args.keep:
        parser.error("--page writes from the kept results: give --keep too")
    if args.tune_seed in args.seeds:
        parser.error(
            f"--tune-seed {args.tune_seed} is among --seeds: the final numbers must come from seeds the tuning did not pick from"
        )
    comparisons = {
        reward: tuple(a for a in algos if not args.algos or a in args.algos)
        for reward, algos in COMPARISONS.items()
    }
    comparisons = {reward: algos for reward, algos in comparisons.items() if algos}
    if args.stage in ("tune", "all"):
        tune(args, comparisons)
    if args.stage in ("final", "all"):
        return final(args, comparisons)


if __name__ == "__main__":
    main()

"""Overoptimisation and the KL leash: the CPU demo at several --kl-coef values, on 3 seeds.

    python benchmarks/kl_tradeoff.py --out runs/kl-tradeoff --jobs 2

Every run is the demo (`train.py --reward jpeg`, the bundled model and its preset, 35 epochs) with
--kl-coef K, trained on `shapes_train` (10 of the toy world's 15 prompts) and evaluated with fixed
noise on all 15 every --eval-every epochs, so each run also measures generalisation to the 5
held-out prompts (the paper's section 6.3, in miniature). Per run it reads metrics.jsonl:

- cut: 1 - last epoch's mean JPEG kB / first epoch's (training samples, trained prompts)
- kept: last epoch's fidelity / first epoch's (toy_world.judge)
- kl_to_base: the final weights' evaluation's KL to the base model (eval_kl_to_base: the same 45 trajectories
  from the same noise at every coefficient, all their steps; the training's kl_to_base is noisier,
  on each epoch's new samples, and at kl-coef 0 on one step a sample)
- eval cut and kept on the trained and the held-out prompts: the evaluation of the weights the
  run ends with against the first (the base model), same noise; "carried" = held-out eval cut / trained eval cut

It writes kl_tradeoff.md (every run, then the median and range per coefficient) and
kl_tradeoff.png (cut against kept, and against kl_to_base, one point a run). It keeps each run's
result files in --keep (docs/kl-leash) and writes the medians into --page (docs/kl-leash.md), one
table for each set of seeds; `--out docs/kl-leash` writes them again from the kept files. A
finished run is reused. With --jobs N, N runs go at once, each its own single-threaded process.
"""

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import run_all  # noqa: E402
from page import ROOT, keep_run, made_by, run_record, write_block  # noqa: E402

COEFS = (
    0.0,
    0.003,
    0.01,
    0.03,
    0.1,
)  # the paper's DDPO, then log-spaced by about sqrt(10) (at 0.1 the JPEG gain is mostly gone)
KEPT = 0.95  # the fidelity a leashed run should keep, as a share of the base model's


def summary(metrics):
    """One run's numbers (module docstring)."""
    epochs = [
        m for m in metrics if "reward_mean" in m
    ]  # the epochs' rows, not the final evaluation's
    first, last = epochs[0], epochs[-1]
    evals = [
        m for m in metrics if "eval_reward_mean" in m
    ]  # the base model's first, the final weights' last
    row = {
        "cut": 1 - last["reward_mean"] / first["reward_mean"],
        "kept": last["fidelity"] / first["fidelity"],
        "kl_to_base": evals[-1]["eval_kl_to_base"],
        "first_kb": -first["reward_mean"],
        "last_kb": -last["reward_mean"],
    }
    start, end = evals[0], evals[-1]
    for group in ("trained", "heldout"):
        row[f"eval_{group}_cut"] = (
            1 - end[f"eval_{group}_reward_mean"] / start[f"eval_{group}_reward_mean"]
        )
        row[f"eval_{group}_kept"] = end[f"eval_{group}_fidelity"] / start[f"eval_{group}_fidelity"]
    row["carried"] = (
        row["eval_heldout_cut"] / row["eval_trained_cut"]
        if row["eval_trained_cut"] > 0
        else float("nan")
    )
    return row


COLUMNS = (
    "first_kb",
    "last_kb",
    "cut",
    "kept",
    "kl_to_base",
    "eval_trained_cut",
    "eval_heldout_cut",
    "carried",
    "eval_trained_kept",
    "eval_heldout_kept",
)


def table(rows):
    """Markdown: every run, then per coefficient the median (and min-max) over its seeds."""
    lines = [
        "| kl-coef | seed | " + " | ".join(COLUMNS) + " | wall s |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for (coef, seed), (row, wall) in sorted(rows.items()):
        lines.append(
            f"| {coef:g} | {seed} | "
            + " | ".join(f"{row[c]:.3g}" for c in COLUMNS)
            + f" | {wall:.0f} |"
        )
    lines += [
        "",
        "| kl-coef | seeds | " + " | ".join(f"{c} median (min-max)" for c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for coef in sorted({coef for coef, _ in rows}):
        seeds = [row for (c, _), (row, _) in rows.items() if c == coef]
        cells = [
            f"{statistics.median(r[c] for r in seeds):.3g} ({min(r[c] for r in seeds):.3g}-{max(r[c] for r in seeds):.3g})"
            for c in COLUMNS
        ]
        lines.append(f"| {coef:g} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def page_table(rows):
    """The page's table: per coefficient the median (min to max) over the seeds."""
    columns = {
        "cut": ("JPEG cut", "{:.1%}"),
        "kept": ("fidelity kept", "{:.2f}"),
        "kl_to_base": ("eval kl_to_base", "{:.3f}"),
        "eval_trained_cut": ("eval cut, trained prompts", "{:.1%}"),
        "eval_heldout_cut": ("eval cut, held-out prompts", "{:.1%}"),
        "carried": ("carried", "{:.2f}"),
    }
    lines = ["| kl-coef | " + " | ".join(name for name, _ in columns.values()) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for coef in sorted({coef for coef, _ in rows}):
        seeds = [row for (c, _), (row, _) in rows.items() if c == coef]
        cells = []
        for key, (_, fmt) in columns.items():
            values = [r[key] for r in seeds]
            low, high = fmt.format(min(values)), fmt.format(max(values))
            cells.append(f"{fmt.format(statistics.median(values))} ({low} to {high})")
        lines.append(f"| {coef:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best(rows):
    """The coefficient with the largest median cut among those whose median run keeps KEPT of its fidelity, or None."""
    medians = {
        coef: {
            key: statistics.median(row[key] for (c, _), (row, _) in rows.items() if c == coef)
            for key in ("cut", "kept")
        }
        for coef, _ in rows
    }
    keeping = [coef for coef, m in medians.items() if m["kept"] >= KEPT]
    return max(keeping, key=lambda coef: medians[coef]["cut"]) if keeping else None


def plot(rows, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    coefs = sorted({coef for coef, _ in rows})
    colours = plt.cm.viridis([k / max(1, len(coefs) - 1) for k in range(len(coefs))])
    for coef, colour in zip(coefs, colours):
        seeds = [row for (c, _), (row, _) in rows.items() if c == coef]
        for ax, key in zip(axes, ("kept", "kl_to_base")):
            ax.scatter(
                [r[key] for r in seeds],
                [100 * r["cut"] for r in seeds],
                color=colour,
                label=f"kl-coef {coef:g}",
            )
    axes[0].axvline(KEPT, color="grey", linestyle=":", label=f"{KEPT:.0%} of the fidelity kept")
    axes[0].set(
        xlabel="fidelity kept (last epoch / first)",
        ylabel="JPEG size cut (%), last epoch vs first",
        title="reward against fidelity",
    )
    axes[1].set(
        xlabel="kl_to_base of the final weights (per latent element)",
        ylabel="JPEG size cut (%)",
        title="reward against drift",
    )
    axes[1].set_xscale("log")
    for ax in axes:
        ax.axhline(30, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--coefs", type=float, nargs="+", default=COEFS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=35, help="the demo's 35")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=17,
        help="epochs between evaluations (and before the first epoch and after the last)",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=45,
        help="evaluation images: 3 of each of the 15 prompts",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/kl-tradeoff"))
    parser.add_argument("--keep", type=Path, default=ROOT / "docs" / "kl-leash")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "kl-leash.md")
    parser.add_argument(
        "--train-args", default="", help="more train.py flags for every run, quoted"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each a single-threaded process"
    )
    args = parser.parse_args(argv)
    common = [
        "--reward",
        "jpeg",
        "--prompts",
        "shapes_train",
        "--eval-prompts",
        "shapes",
        "--eval-every",
        str(args.eval_every),
        "--eval-samples",
        str(args.eval_samples),
    ]
    tasks = {
        (coef, seed): (
            [*common, "--kl-coef", f"{coef:g}", "--seed", str(seed)],
            args.out / f"kl{coef:g}-seed{seed}",
        )
        for seed in args.seeds
        for coef in args.coefs
    }
    rows = {key: (summary(metrics), wall) for key, (metrics, wall) in run_all(tasks, args).items()}
    chosen = best(rows)
    text = (
        table(rows)
        + f"\n\nThe largest median cut among the kl-coefs whose median run keeps {KEPT:.0%} of its fidelity: {chosen if chosen is not None else 'none'}\n"
    )
    print(text)
    (args.out / "kl_tradeoff.md").write_text(text)
    plot(rows, args.out / "kl_tradeoff.png")
    runs = [args.out / f"kl{coef:g}-seed{seed}" for coef, seed in tasks]
    if args.out.resolve() != args.keep.resolve():
        for run in runs:
            keep_run(run, args.keep / run.name)
        seeds_name = "-".join(map(str, args.seeds))
        shutil.copyfile(
            args.out / "kl_tradeoff.png", args.keep / f"kl_tradeoff-seeds{seeds_name}.png"
        )
    records = [run_record(run) for run in runs]
    seeds = " ".join(map(str, args.seeds))
    coefs = " ".join(f"{coef:g}" for coef in args.coefs)
    command = f"python benchmarks/kl_tradeoff.py --jobs 2 --coefs {coefs} --seeds {seeds}"
    body = (
        f"Seeds {seeds}, medians (min to max).\n\n{page_table(rows)}\n\n{made_by(command, records)}"
    )
    write_block(args.page, f"kl_tradeoff seeds {seeds}", body)
    return rows


if __name__ == "__main__":
    main()

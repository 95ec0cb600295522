"""The two bundled models side by side: `python train.py --reward jpeg` on the DDIM model
(toy_world/tiny-shapes) and on the flow model (toy_world/tiny-flow), same preset, same seeds.

    python benchmarks/flow_vs_ddim.py --seeds 0 1 2 --out runs/flow-vs-ddim

Each run is the CPU demo's (benchmarks/cpu_demo.py: the plain command in its own process, only
--model, --seed and --out added, its wall clock timed). The runs are interleaved, the order of the
two models swapped from one seed to the next, so that a slower stretch of a shared machine falls on
both. It keeps each run's result files in --keep (docs/flow-vs-ddim) and writes one table a model,
each with its median, and the median's difference into --page (docs/flow-models.md);
`--out docs/flow-vs-ddim` writes the page again from the kept files, measuring nothing.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_demo import medians, run_seed, table  # noqa: E402
from machinery.config import BUNDLED_FLOW_MODEL, BUNDLED_MODEL  # noqa: E402
from page import keep_run, made_by, write_block  # noqa: E402

MODELS = {"ddim": BUNDLED_MODEL, "flow": BUNDLED_FLOW_MODEL}
TITLES = {"ddim": "DDIM step, toy_world/tiny-shapes", "flow": "SDE step, toy_world/tiny-flow"}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/flow-vs-ddim"))
    parser.add_argument("--keep", type=Path, default=ROOT / "docs" / "flow-vs-ddim")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "flow-models.md")
    args = parser.parse_args()
    results = {name: [] for name in MODELS}
    for k, seed in enumerate(args.seeds):
        for name in list(MODELS)[:: 1 if k % 2 == 0 else -1]:  # swapped every other seed
            out = args.out / name / f"seed{seed}"
            results[name].append(run_seed(seed, out, MODELS[name]))
    blocks = [f"**{TITLES[name]}**\n\n{table(results[name])}" for name in MODELS]
    median = {name: medians(rs) for name, rs in results.items()}
    blocks.append(
        "Medians, flow against DDIM: cut {:+.1f} points, fidelity kept {:+.2f}, wall time "
        "{:.2f} x.".format(
            100 * (median["flow"]["cut_last5"] - median["ddim"]["cut_last5"]),
            median["flow"]["kept_last5"] - median["ddim"]["kept_last5"],
            median["flow"]["wall_seconds"] / median["ddim"]["wall_seconds"],
        )
    )
    for block in blocks:
        print(block, end="\n\n")
    if args.out.resolve() != args.keep.resolve():
        for name in MODELS:
            for seed in args.seeds:
                keep_run(args.out / name / f"seed{seed}", args.keep / name / f"seed{seed}")
    seeds = " ".join(str(seed) for seed in args.seeds)
    command = f"python benchmarks/flow_vs_ddim.py --seeds {seeds}"
    every = [r for rs in results.values() for r in rs]
    write_block(args.page, "flow_vs_ddim", "\n\n".join(blocks) + "\n\n" + made_by(command, every))


if __name__ == "__main__":
    main()

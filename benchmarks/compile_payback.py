"""Does --compile pay for itself within the CPU demo? The whole wall time of the demo command,
eager and compiled, the compiling included.

    python benchmarks/compile_payback.py --rounds 2          # python train.py --reward jpeg: 35 epochs
    python benchmarks/compile_payback.py --arms eager cold -- --epochs 10

Each run is the demo command (plus --out, --compile and what follows `--`) in its own process, and
the arms take turns: eager, cold, warm, eager, cold, warm... "eager" is the command as it is.
"cold" adds --compile with an empty compile cache: a machine that has never compiled this UNet,
as on anyone's first run. "warm" adds --compile with the cache that an unmeasured compiled run
filled before the rounds: every later run on the same machine. The cache is PyTorch Inductor's on
disk, pointed at folders of this benchmark (TORCHINDUCTOR_CACHE_DIR), so the machine's own cache is
neither read nor written. The table gives each run's wall time (start of the process to its end),
its first epoch's sampling + update seconds (where the compiling happens) and the median of the
others, and each arm's median wall time over the eager arm's. With --keep FILE --page PAGE it
keeps the runs' seconds, with the commit and machine, and writes the table into the page; --report
writes the page again from the kept file, measuring nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from page import measured_or_kept, provenance, write_table  # noqa: E402

ARMS = {"eager": [], "cold": ["--compile"], "warm": ["--compile"]}


def run(arm, out, cache, train_args):
    """One demo run: its wall seconds and each epoch's sampling + update seconds."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--reward",
            "jpeg",
            "--out",
            str(out),
            *ARMS[arm],
            *train_args,
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [
        m["sample_seconds"] + m["train_seconds"] for m in metrics if "reward_mean" in m
    ]  # not a final evaluation's row
    return {"wall": wall, "first": epochs[0], "epochs": epochs}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="turns of the arms")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--keep", type=Path, help="a JSON file to keep the runs' seconds in")
    parser.add_argument("--page", type=Path, help="write the table into this page (with --keep)")
    parser.add_argument(
        "--report", action="store_true", help="the page from --keep, measuring nothing"
    )
    parser.add_argument("train_args", nargs="*", help="after --: more flags for train.py")
    args = parser.parse_args(argv)
    if (args.page or args.report) and not args.keep:
        parser.error("--page and --report read the kept results: give --keep too")
    results = measured_or_kept(args.report, args.keep, lambda: measure(args))
    if args.page:
        write_table(args.page, "compile_payback", table, results)
    return results["runs"]


def measure(args):
    """The arms' runs, taking turns: their seconds, the command and its provenance."""
    runs, record = {arm: [] for arm in args.arms}, provenance()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (
            "warm" in args.arms
        ):  # fill the warm arm's cache: a compiled run of one epoch, not measured
            run("warm", tmp / "prime", tmp / "cache-warm", [*args.train_args, "--epochs", "1"])
        for turn in range(args.rounds):
            for arm in args.arms:
                cache = tmp / (
                    "cache-warm" if arm == "warm" else f"cache-{arm}-{turn}"
                )  # cold: a new, empty one each time
                runs[arm].append(run(arm, tmp / f"{arm}-{turn}", cache, args.train_args))
                result = runs[arm][-1]
                print(
                    f"round {turn} {arm}: wall {result['wall']:.1f} s, epochs "
                    + " ".join(f"{s:.2f}" for s in result["epochs"]),
                    flush=True,
                )
    print(table(runs))
    command = f"python benchmarks/compile_payback.py --rounds {args.rounds} --arms "
    return {"runs": runs, "command": command + " ".join(args.arms), **record}


def table(runs):
    """Each run's wall time, first epoch and the median of the others; each arm's median wall time
    over the eager arm's."""
    medians = {arm: statistics.median(r["wall"] for r in results) for arm, results in runs.items()}
    lines = [
        "| arm | wall time of each run (s) | first epoch (s) | median of the other epochs (s) | median wall / eager's |",
        "|---|---|---|---|---|",
    ]
    for arm, results in runs.items():
        walls, firsts = (", ".join(f"{r[key]:.1f}" for r in results) for key in ("wall", "first"))
        rest = ", ".join(f"{statistics.median(r['epochs'][1:]):.2f}" for r in results)
        ratio = f"{medians[arm] / medians['eager']:.2f}" if "eager" in medians else "-"
        lines.append(f"| {arm} | {walls} | {firsts} | {rest} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

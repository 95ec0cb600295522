"""Killed at any moment, resumed each time: does a run end exactly as if it had never stopped?

    python benchmarks/kill_soak.py --kills 30 --seed 0      # about 15 minutes on 2 cores
    python benchmarks/kill_soak.py --report                 # the page again from the kept results

A short run of the bundled model (RUN: 4 epochs, a fixed-noise evaluation every 2 and after the
last, single-threaded) goes straight through once; its wall time T sets the schedule. Then the same
run, in a folder of its own, is killed with SIGKILL after a delay drawn uniformly from [0, T] (a
seeded schedule), resumed with --resume, killed again, and so on until it finishes; when it has
finished, a new round starts, until --kills kills have landed, and the last round is resumed to
its end without more. A kill before the run has written its config.json leaves no run to resume:
that round starts afresh in the same folder (counted). Just before each kill the process's Python
stack is dumped (faulthandler on SIGUSR1, registered by the launcher below; train.py is run
unchanged) and named by the deepest phase it shows. Every finished round is compared with the
straight run as same_outputs.py compares two revisions: metrics.jsonl (timings aside), the LoRA's
bytes and the last checkpoint's state. The table goes into docs/operations.md.
"""

import argparse
import collections
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page import measured_or_kept, provenance, write_block  # noqa: E402
from same_outputs import same, written  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = (
    "--epochs 4 --samples-per-epoch 16 --batch-size 4 --num-steps 8 --eval-every 2 "
    "--eval-samples 8 --prompts shapes --seed 5"
).split()
LAUNCH = """
import faulthandler, runpy, signal, sys
stack = open(sys.argv[1], "w")
faulthandler.register(signal.SIGUSR1, file=stack, all_threads=False)
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""
# the phase a stack shows, the first that matches: (phase, (file, function) pairs in the dump)
PHASES = [
    ("evaluation", [("run.py", "evaluate")]),
    ("checkpoint write", [("checkpoints.py", f) for f in ("save", "write", "torch_save")]),
    ("resume (the checkpoint read)", [("checkpoints.py", f) for f in ("read", "restore")]),
    ("LoRA export", [("epoch_log.py", "export_weights")]),
    ("logging (metrics, grid, curve)", [("epoch_log.py", "log_epoch"), ("run.py", "log")]),
    ("update", [("train.py", "update")]),
    ("reward", [("rewards.py", "jpeg_compressibility"), ("run.py", "gather_rewards")]),
    ("advantages", [("train.py", "epoch_advantages")]),
    ("start-up (model, folder)", [("run.py", "__init__"), ("run.py", "__enter__")]),
    ("between phases (train.main's own lines)", [("train.py", "main")]),
]
FRAME = re.compile(r'File "(?:[^"]*/)?([^"/]+)", line \d+ in (\w+)')


def phase(dump):
    """The phase of a faulthandler dump: its frames' (file, function) against PHASES; sampling
    wherever sample_trajectories runs outside the evaluation."""
    frames = set(FRAME.findall(dump))
    if ("sampler.py", "sample_trajectories") in frames and ("run.py", "evaluate") not in frames:
        return "sampling"
    for name, marks in PHASES:
        if frames & set(marks):
            return name
    return "start-up (imports)"


def start(out, stack, fresh, flags=RUN):
    """train.py under the launcher, a new run in out or its resume; its stderr to out's side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    flags = [*flags, "--out", str(out)] if fresh else ["--resume", str(out)]
    command = [sys.executable, "-c", LAUNCH, str(stack), *flags]
    errors = open(stack.with_suffix(".err"), "a")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)


def finish(process, out, flags=RUN):
    """Wait for the run; a resume refused because the run had finished (killed after its last
    write) counts as finished."""
    if process.wait() == 0 or done(out, flags):
        return
    raise SystemExit(f"kill_soak.py: a run in {out} failed (exit {process.returncode})")


def done(out, flags=RUN):
    """Whether the run in out has every epoch's metrics and its final evaluation's row."""
    lines = (
        (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    )
    epochs = int(flags[flags.index("--epochs") + 1])
    return len(lines) == epochs + 1 and any(
        (out / "checkpoints").glob(f"epoch_{epochs - 1:04d}.pt")
    )


def soak(work, kills, seed, wall, flags=RUN):
    """Kill rounds of the run until `kills` kills have landed; returns each kill's phase, the
    fresh starts forced by a kill before config.json, and the finished rounds' folders."""
    rng, landed, afresh, rounds = np.random.default_rng(seed), [], 0, []
    while len(landed) < kills:
        out, fresh = work / f"round{len(rounds)}", True
        while True:
            stack = work / "stack.txt"
            process = start(out, stack, fresh, flags)
            try:
                finish_in = rng.uniform(0, wall)
                process.wait(timeout=finish_in)
                finish(process, out, flags)
                break  # the round finished before its next kill
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGUSR1)
                time.sleep(0.3)  # the dump is written by the signal's handler, at once
                process.kill()
                process.wait()
                landed.append(phase(stack.read_text()))
            if done(out, flags):  # killed after the run's last write: nothing left to do
                break
            fresh = not (out / "config.json").is_file()
            if fresh:  # killed before the run had written its settings: nothing to resume
                afresh += 1
                shutil.rmtree(out, ignore_errors=True)
            if len(landed) >= kills:
                finish(start(out, work / "stack.txt", fresh, flags), out, flags)
                break
        rounds.append(out)
    return landed, afresh, rounds


def measure(args):
    work = Path(tempfile.mkdtemp(prefix="kill-soak-"))
    began = time.time()
    finish(start(work / "straight", work / "stack.txt", True), work / "straight")
    wall = time.time() - began
    landed, afresh, rounds = soak(work, args.kills, args.seed, wall)
    reference = written(work / "straight")
    verdicts = []
    for out in rounds:
        ours = written(out)
        verdicts.append({part: same(reference[part], ours[part]) for part in reference})
    shutil.rmtree(work, ignore_errors=True)
    return {
        "command": f"python benchmarks/kill_soak.py --kills {args.kills} --seed {args.seed}",
        "wall_seconds": wall,
        "phases": dict(collections.Counter(landed)),
        "afresh": afresh,
        "rounds": verdicts,
        **provenance(),
    }


def table(results):
    rows = "\n".join(f"| {name} | {n} |" for name, n in sorted(results["phases"].items()))
    rounds = results["rounds"]
    equal = sum(all(v.values()) for v in rounds)
    parts = ", ".join(
        f"{part} {sum(v[part] for v in rounds)} of {len(rounds)}" for part in rounds[0]
    )
    return (
        f"| where the kill landed | kills |\n|---|---|\n{rows}\n\n"
        f"{sum(results['phases'].values())} kills with SIGKILL, delays drawn from [0, "
        f"{results['wall_seconds']:.0f} s] (the straight run's wall time), over "
        f"{len(rounds)} rounds of the run, each resumed until it finished; "
        f"kills before the run had written its config.json, which start their round afresh: "
        f"{results['afresh']}. "
        f"Rounds equal to the straight run in metrics (timings aside), LoRA bytes and the last "
        f"checkpoint: **{equal} of {len(rounds)}** ({parts}).\n\n"
        f"Made by `{results['command']}`: commit `{results['commit']}` on {results['machine']}, "
        f"{results['date']}."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="the page from the kept results")
    parser.add_argument("--keep", default=str(ROOT / "docs" / "kill-soak" / "results.json"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "operations.md"))
    args = parser.parse_args(argv)
    results = measured_or_kept(args.report, Path(args.keep), lambda: measure(args))
    write_block(args.page, "kill_soak", table(results))
    print(table(results))
    return 0 if all(all(v.values()) for v in results["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())

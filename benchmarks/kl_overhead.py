"""What the KL leash costs per epoch, measured in one process with the arms interleaved.

    python benchmarks/kl_overhead.py --repeats 3                 # the bundled model with its preset
    python benchmarks/kl_overhead.py --kl-coef 1 -- --num-steps 10

Three arms, each a run of train.py's loop through benchmarks/overhead.py (the first epoch warms up
and is not counted): "no kl_to_base" (train.update without the base policy, as the loop was before
the leash), "kl-coef 0" (the default: kl_to_base measured on the first trained step of each
sample of the epoch's first minibatch) and
"kl-coef K" (the penalty on every trained step: one more no-grad guided forward each). They run
A, B, C, A, B, C...; the table gives each repeat's seconds per epoch, the medians, and their
ratios to the "no kl_to_base" arm, with the UNet calls of one counted epoch. Arguments after `--` go
to train.py.
"""

import argparse
import contextlib
import io
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402
import train  # noqa: E402


@contextlib.contextmanager
def without_kl_measurement():
    update = train.update

    def no_base(cfg, run, *args):
        run.base = None  # as the loop was before the leash: no base policy, no kl_to_base
        return update(cfg, run, *args)

    train.update = no_base
    try:
        yield
    finally:
        train.update = update


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs a run; the first is not counted"
    )
    parser.add_argument("--kl-coef", type=float, default=1.0)
    parser.add_argument("train_args", nargs="*", help="more train.py arguments, after --")
    args = parser.parse_args(argv)
    arms = {
        "no kl_to_base": (without_kl_measurement, []),
        "kl-coef 0": (contextlib.nullcontext, []),
        f"kl-coef {args.kl_coef:g}": (contextlib.nullcontext, ["--kl-coef", f"{args.kl_coef:g}"]),
    }
    seconds, calls = {arm: [] for arm in arms}, {}
    for repeat in range(args.repeats):
        for arm, (context, flags) in arms.items():
            with context(), contextlib.redirect_stdout(io.StringIO()):
                result = overhead.main(
                    ["--epochs", str(args.epochs), "--", *args.train_args, *flags]
                )
            seconds[arm].append(result["epoch_seconds"])
            calls[arm] = [
                result[key] // (args.epochs - 1)
                for key in ("sampling_calls", "training_calls", "base_calls")
            ]  # per counted epoch
            print(f"repeat {repeat} {arm}: {result['epoch_seconds']:.2f} s/epoch", flush=True)
    reference = statistics.median(seconds["no kl_to_base"])
    lines = [
        "| arm | s/epoch, each repeat | median | ratio | UNet calls an epoch: sampling, update (base) |",
        "|---|---|---|---|---|",
    ]
    for arm, values in seconds.items():
        median = statistics.median(values)
        sampling, update, base = calls[arm]
        lines.append(
            f"| {arm} | {', '.join(f'{v:.2f}' for v in values)} | {median:.2f} | {median / reference:.3f} | {sampling}, {update} ({base}) |"
        )
    print("\n".join(lines))
    return seconds


if __name__ == "__main__":
    main()

"""How close a training epoch comes to its compute floor.

    python benchmarks/overhead.py                          # the bundled model with its preset, 4 epochs
    python benchmarks/overhead.py --epochs 3 -- --num-steps 10 --samples-per-epoch 32

Nearly all of DDPO's cost is UNet work: T guided forward passes per sample to sample it, and a
forward and backward pass per trained step. This script runs train.py's own loop (train.main, in
this process, into a temporary run folder) and records every UNet call: its input shapes, its
phase (sampling or update) and whether it had a gradient (the update's calls do, but for the base
policy's forwards of the KL term). After each epoch has logged it replays exactly that epoch's
calls, back to back, on random inputs of the same shapes: no-grad forwards, or forward + backward
for the calls with a gradient (at once, beside the epoch: this machine's speed drifts by tens of
percent over minutes, and an epoch and its replay see the same; the replays' own seconds are not
counted in the epochs'). The first epoch warms up and is not counted. That replay is the floor;
everything the epochs took beyond it (text encoding, the VAE, the per-step Python, copies,
rewards, logging, saving) is overhead. The last line is overhead_ratio=<epochs / floor>.
Arguments after `--` go to train.py.

    python benchmarks/overhead.py --keep docs/speed/overhead.json --page docs/speed.md

adds the result, with the commit and machine, to the kept results and writes their table into the
page (`--page` alone writes it again from the kept results, measuring nothing).
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import machinery.run  # noqa: E402
import train  # noqa: E402
from machinery.pipeline import autocast as forwards_autocast  # noqa: E402
from page import made_by, provenance, save_json, write_block  # noqa: E402

ROWS = {  # the page's rows: a result's key, what it is
    "sample_seconds": "sampling, s an epoch",
    "sample_floor": "its floor: the same UNet calls replayed",
    "train_seconds": "training, s an epoch",
    "train_floor": "its floor",
    "rest_seconds": "the rest (rewards, advantages, logging, saving)",
    "epoch_seconds": "epoch",
    "floor_seconds": "its floor",
    "overhead_ratio": "**overhead_ratio**",
}


@contextlib.contextmanager
def instrument(calls, epoch_starts, pipes, after_epoch=None):
    """While inside, train.main records each UNet call, the start of each epoch's sampling, and its
    pipeline; after_epoch(run), when given, is called once each epoch has logged."""
    load_model, sample_trajectories, update, log = (
        machinery.run.load_model,
        train.sample_trajectories,
        train.update,
        machinery.run.Run.log,
    )
    phase = ["sampling"]

    def record(unet, args, kwargs):
        sample, timestep, context = (
            list(args) + [kwargs.get("timestep"), kwargs.get("encoder_hidden_states")]
        )[:3]
        calls.append(
            (
                time.perf_counter(),
                tuple(sample.shape),
                tuple(context.shape),
                torch.is_grad_enabled(),
                phase[0],
            )
        )

    def loading(*args, **kwargs):
        pipe = load_model(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        pipes.append(pipe)
        return pipe

    def sampling(*args, **kwargs):
        epoch_starts.append(time.perf_counter())
        return sample_trajectories(*args, **kwargs)

    def updating(*args, **kwargs):
        phase[0] = "update"
        try:
            return update(*args, **kwargs)
        finally:
            phase[0] = "sampling"

    def logging(*args, **kwargs):
        try:
            return log(*args, **kwargs)
        finally:
            if after_epoch is not None:
                after_epoch(args[0])

    machinery.run.load_model, train.sample_trajectories, train.update = loading, sampling, updating
    machinery.run.Run.log = logging
    try:
        yield
    finally:
        machinery.run.load_model, train.sample_trajectories, train.update = (
            load_model,
            sample_trajectories,
            update,
        )
        machinery.run.Run.log = log


def replay(unet, calls, autocast):
    """The same UNet calls on random inputs (a generator of their own), back to back: seconds of the
    sampling phase's and the update phase's (no-grad forwards, or forward + backward for the calls
    with a gradient). The gradients it leaves are set to None."""
    seconds = {"sampling": 0.0, "update": 0.0}
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator(device).manual_seed(0)
    for _, sample_shape, context_shape, training, phase in calls:
        sample = torch.randn(sample_shape, device=device, dtype=dtype, generator=generator)
        context = torch.randn(context_shape, device=device, dtype=dtype, generator=generator)
        timestep = torch.randint(0, 1000, sample_shape[:1], device=device, generator=generator)
        start = time.perf_counter()
        with torch.set_grad_enabled(training), autocast:
            out = unet(sample, timestep, context).sample
        if training:
            out.float().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[phase] += time.perf_counter() - start
    unet.zero_grad(set_to_none=True)
    return seconds["sampling"], seconds["update"]


class Interleaved:
    """The floor measured beside the loop: after each epoch has logged, that epoch's UNet calls
    replayed at once (the machine's speed drifts over minutes; an epoch and its replay see the
    same). Keeps each epoch's floors and the seconds the replays took."""

    def __init__(self, calls, epoch_starts):
        self.calls, self.epoch_starts, self.done, self.floors, self.spent = (
            calls,
            epoch_starts,
            0,
            [],
            [],
        )

    def __call__(self, run):
        start, unet = time.perf_counter(), run.pipe.unet
        # the epoch's own calls: not an evaluation's before its sampling (--eval-every)
        epoch_calls = [c for c in self.calls[self.done :] if c[0] >= self.epoch_starts[-1]]
        self.done = len(self.calls)
        autocast = forwards_autocast(unet.device, run.cfg.mixed_precision)
        self.floors.append(replay(unet, epoch_calls, autocast))
        del self.calls[self.done :]  # the replay's own calls, recorded by the hook
        self.spent.append(time.perf_counter() - start)


def arguments(argv, description):
    """The flags this script and profile_epoch.py share, checked: --epochs, --keep, --page,
    --report, and train.py's arguments after `--`."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs to run; the first is warm-up and not counted"
    )
    parser.add_argument("--keep", type=Path, help="a JSON file of results to add this one to")
    parser.add_argument("--page", type=Path, help="write the kept results' table into this page")
    parser.add_argument("--report", action="store_true", help="with --page: measure nothing")
    parser.add_argument("train_args", nargs="*", help="more train.py arguments, after --")
    args = parser.parse_args(argv)
    if (args.page or args.report) and not args.keep:
        parser.error("--page and --report read the kept results: give --keep too")
    if not args.report and args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one only warms up")
    return args


def keep(args, result, page):
    """result added to the results kept in --keep, and with --page their table written into it
    (page(keep, path): the script's own)."""
    if args.keep:
        kept = json.loads(args.keep.read_text()) if args.keep.is_file() else []
        save_json(args.keep, [*kept, result])
        if args.page:
            page(args.keep, args.page)


def main(argv=None):
    args = arguments(argv, __doc__)
    if args.report:
        return page(args.keep, args.page)
    calls, epoch_starts, pipes, record = [], [], [], provenance()
    floors = Interleaved(calls, epoch_starts)
    with instrument(calls, epoch_starts, pipes, floors), tempfile.TemporaryDirectory() as tmp:
        history = train.main(
            ["--epochs", str(args.epochs), "--out", f"{tmp}/run", *args.train_args]
        )
        end = time.perf_counter()
        cfg = json.loads(Path(f"{tmp}/run/config.json").read_text())
    counted = [c for c in calls if c[0] >= epoch_starts[1]]
    epochs = history[1:]
    measured = end - epoch_starts[1] - sum(floors.spent[1:])  # the replays taken out
    sample_s, train_s = (
        sum(m["sample_seconds"] for m in epochs),
        sum(m["train_seconds"] for m in epochs),
    )
    floor_sample, floor_train = (sum(phase) for phase in zip(*floors.floors[1:]))

    n = len(epochs)
    sampling_calls = sum(c[4] == "sampling" for c in counted)
    base_calls = sum(c[4] == "update" and not c[3] for c in counted)
    print(
        f"{n} epochs counted ({cfg['samples_per_epoch']} samples, {cfg['num_steps']} steps, batch {cfg['batch_size']}, "
        f"{cfg['model']} on {cfg['device']}, {torch.get_num_threads()} threads)"
    )
    print(
        f"UNet calls: {sampling_calls} sampling, {len(counted) - sampling_calls} training ({base_calls} of them the base policy's, no gradient)"
    )
    print(f"sampling   {sample_s / n:7.2f} s/epoch   floor {floor_sample / n:7.2f}")
    print(f"training   {train_s / n:7.2f} s/epoch   floor {floor_train / n:7.2f}")
    print(
        f"the rest   {(measured - sample_s - train_s) / n:7.2f} s/epoch   (rewards, advantages, logging, saving)"
    )
    print(f"epoch      {measured / n:7.2f} s         floor {(floor_sample + floor_train) / n:7.2f}")
    ratio = measured / (floor_sample + floor_train)
    print(f"overhead_ratio={ratio:.3f}")
    result = {
        "sampling_calls": sampling_calls,
        "training_calls": len(counted) - sampling_calls,
        "base_calls": base_calls,
        "overhead_ratio": ratio,
        "epoch_seconds": measured / n,
        "floor_seconds": (floor_sample + floor_train) / n,
        "sample_seconds": sample_s / n,
        "sample_floor": floor_sample / n,
        "train_seconds": train_s / n,
        "train_floor": floor_train / n,
        "rest_seconds": (measured - sample_s - train_s) / n,
        "command": " ".join(["python benchmarks/overhead.py", *(argv or sys.argv[1:])]),
        **record,
    }
    keep(args, result, page)
    return result


def page(keep, path):
    """The kept results' table, a column each, into the page."""
    results = json.loads(keep.read_text())
    lines = ["| per epoch | " + " | ".join(f"run {i + 1}" for i in range(len(results))) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for key, name in ROWS.items():
        fmt = "**{:.3f}**" if key == "overhead_ratio" else "{:.2f} s"
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")
    commands = sorted({r["command"].split(" --keep")[0] for r in results})
    write_block(
        path, "overhead", "\n".join(lines) + "\n\n" + made_by(" ; ".join(commands), results)
    )
    return results


if __name__ == "__main__":
    main()

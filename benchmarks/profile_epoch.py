"""Where an epoch's seconds go, beside its compute floor.

    python benchmarks/profile_epoch.py                      # the bundled model, its preset, 4 epochs
    python benchmarks/profile_epoch.py -- --steps-per-forward 5
    python benchmarks/profile_epoch.py --keep docs/speed/profile.json --page docs/speed.md

Runs train.py's own loop (train.main, in this process, into a temporary run folder) with a clock
around each named part of an epoch: the text encoder, the denoiser's calls, the guided batch
around them, the policy step and its log-prob, the VAE decode, the reward, the backward pass, the
KL to the base policy, the optimiser, the plots and the checkpoint. Each part's own seconds are
kept (a part inside another is taken out of it; "the rest" of a phase is what no part holds). The
first epoch warms up and is not counted. Then it replays the counted denoiser calls back to back
on random inputs of the same shapes (benchmarks/overhead.py's floor). The floor's work is the
denoiser's calls and the update's backward pass; every other row is beyond the floor, and so is
what those two took in the loop beyond their replay. Arguments after `--` go to train.py.
"""

import contextlib
import functools
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import machinery.run  # noqa: E402
import sampler  # noqa: E402
import train  # noqa: E402
from machinery import checkpoints, epoch_log  # noqa: E402
from machinery.families import FAMILIES  # noqa: E402
from overhead import Interleaved, arguments, instrument, keep  # noqa: E402
from page import made_by, provenance, write_block  # noqa: E402

# (phase, part): what the page calls it
PARTS = {
    ("sampling", "encode"): "text encoder",
    ("sampling", "denoiser"): "denoiser calls (floor)",
    ("sampling", "guided"): "guided batch: concatenation, w (eps_c - eps_u)",
    ("sampling", "step"): "policy step: mean, std, noise, log-prob",
    ("sampling", "decode"): "VAE decode",
    ("sampling", "rest"): "the rest: loop, x_T, stacking, checks",
    ("between", "rest"): "between the phases: reward, gathering, advantages, prompts",
    ("update", "denoiser"): "denoiser forwards with gradient (floor)",
    ("update", "backward"): "backward pass (floor)",
    ("update", "guided"): "guided batch: concatenation, w (eps_c - eps_u)",
    ("update", "step"): "log-prob of the stored actions",
    ("update", "kl"): "kl_to_base: the KL and its bookkeeping",
    ("update", "base"): "kl_to_base: the base policy's forwards (floor)",
    ("update", "optimizer"): "gradient clip and AdamW step",
    ("update", "rest"): "the rest: advantages, shuffling, loss, stats",
    ("log", "plots"): "reward curve, sample grid, weights (epoch_log.log_epoch)",
    ("log", "checkpoint"): "checkpoint",
    ("log", "rest"): "the rest: judge, metrics, console",
}
FLOOR = {
    ("sampling", "denoiser"),
    ("update", "denoiser"),
    ("update", "backward"),
    ("update", "base"),
}


@contextlib.contextmanager
def patched(obj, name, wrapper):
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def clocks(own):
    """While inside, train.main's named parts add their own wall seconds (less those of the parts
    called inside them) to own[(phase, part)]; a phase's total is own[(phase, "total")]."""
    phase, stack = ["sampling"], []

    def clocked(part):
        def wrap(function):
            @functools.wraps(function)
            def call(*args, **kwargs):
                name = part(args) if callable(part) else part
                stack.append([time.perf_counter(), 0.0])
                try:
                    return function(*args, **kwargs)
                finally:
                    start, inner = stack.pop()
                    elapsed = time.perf_counter() - start
                    own[(phase[0], name)] += elapsed - inner
                    if stack:
                        stack[-1][1] += elapsed

            return call

        return wrap

    def phased(name):
        def wrap(function):
            @functools.wraps(function)
            def call(*args, **kwargs):
                phase[0], start = name, time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    own[(name, "total")] += time.perf_counter() - start
                    phase[0] = "between"  # an evaluation's parts are no phase's

            return call

        return wrap

    def denoiser(args):  # the update's forwards without gradient are the base policy's
        return "base" if phase[0] == "update" and not torch.is_grad_enabled() else "denoiser"

    def timed(policy):  # a model family's policy, its parts clocked
        return policy._replace(
            encode_prompts=clocked("encode")(policy.encode_prompts),
            predict=clocked(denoiser)(policy.predict),
            decode=clocked("decode")(policy.decode),
        )

    families = [
        importlib.import_module(f"machinery.families.{name}") for name in set(FAMILIES.values())
    ]
    patches = [
        *(patched(module, "POLICY", timed) for module in families),
        patched(sampler, "guided_prediction", clocked("guided")),
        patched(sampler, "step_with_logprob", clocked("step")),
        patched(train, "guided_prediction", clocked("guided")),
        patched(train, "step_with_logprob", clocked("step")),
        patched(train, "kl_penalty", clocked("kl")),
        patched(train, "optimizer_step", clocked("optimizer")),
        patched(torch.Tensor, "backward", clocked("backward")),
        patched(epoch_log, "log_epoch", clocked("plots")),
        patched(checkpoints, "save", clocked("checkpoint")),
        patched(train, "sample_trajectories", phased("sampling")),
        patched(train, "update", phased("update")),
        patched(machinery.run.Run, "log", phased("log")),
    ]
    with contextlib.ExitStack() as stack_of_patches:
        for patch in patches:
            stack_of_patches.enter_context(patch)
        yield


def measure(args):
    """Run the epochs with the clocks on and each epoch's floor replayed after it (overhead.py):
    seconds an epoch of each part, and of the floor."""
    calls, epoch_starts, pipes, record = [], [], [], provenance()
    own, per_epoch, ends = defaultdict(float), [], []
    floors = Interleaved(calls, epoch_starts)

    def after_epoch(run):  # its parts kept, its end marked, its floor replayed (clocks not kept)
        per_epoch.append(dict(own))
        ends.append(time.perf_counter())
        floors(run)
        own.clear()

    with clocks(own), instrument(calls, epoch_starts, pipes, after_epoch):
        with tempfile.TemporaryDirectory() as tmp:
            train.main(["--epochs", str(args.epochs), "--out", f"{tmp}/run", *args.train_args])
            cfg = json.loads(Path(f"{tmp}/run/config.json").read_text())
    n = args.epochs - 1
    seconds = defaultdict(float)
    for epoch in per_epoch[1:]:
        for (phase, part), value in epoch.items():
            seconds[f"{phase}/{part}"] += value / n
    for phase in ("sampling", "update", "log"):
        parts = sum(v for k, v in seconds.items() if k.startswith(phase + "/") and "total" not in k)
        seconds[f"{phase}/rest"] = seconds[f"{phase}/total"] - parts
    epochs = [end - start for start, end in zip(epoch_starts, ends)][1:]
    phases = sum(seconds[f"{phase}/total"] for phase in ("sampling", "update", "log"))
    seconds["between/rest"] = sum(epochs) / n - phases
    floor_sample, floor_update = (sum(phase) / n for phase in zip(*floors.floors[1:]))
    settings = ("samples_per_epoch", "batch_size", "sample_batch_size", "steps_per_forward")
    extra = [] if args.epochs == 4 else [f"--epochs {args.epochs}"]
    if args.train_args:
        extra += ["--", *args.train_args]
    return {
        "seconds": dict(seconds),
        "floor": {"sampling": floor_sample, "update": floor_update},
        "epoch_seconds": sum(epochs) / n,
        "settings": {k: cfg[k] for k in (*settings, "num_steps")},
        "threads": torch.get_num_threads(),
        "command": " ".join(["python benchmarks/profile_epoch.py", *extra]),
        **record,
    }


def beyond_floor(result):
    """Each row's seconds an epoch, and the seconds beyond the floor: every part but the floor's,
    and what the floor's parts took in the loop beyond their replay."""
    seconds, floor = result["seconds"], result["floor"]
    rows = {key: seconds.get("/".join(key), 0.0) for key in PARTS}
    for phase in ("sampling", "update"):
        in_loop = sum(rows[key] for key in FLOOR if key[0] == phase)
        rows[(phase, "gap")] = in_loop - floor[phase]
    beyond = sum(value for key, value in rows.items() if key not in FLOOR)
    return rows, beyond


def setting(result):
    """A kept result's column heading: its train.py arguments, or the plain command."""
    given = result["command"].partition(" -- ")[2]
    return f"`{given}`" if given else "plain command"


def table(results):
    """The page's table: each part's seconds an epoch, a column for each kept result; the floor's
    parts marked; then the floor, what lies beyond it and the ratio."""
    columns = [beyond_floor(result) for result in results]
    lines = ["| phase | part | " + " | ".join(setting(r) for r in results) + " |"]
    lines.append("|---|---|" + "---|" * len(results))
    names = {**PARTS, ("sampling", "gap"): "the floor's parts in the loop, beyond their replay"}
    names[("update", "gap")] = names[("sampling", "gap")]
    for key, name in names.items():
        values = " | ".join(f"{rows[key]:.3f}" for rows, _ in columns)
        lines.append(f"| {key[0]} | {name} | {values} |")
    epoch = " | ".join(f"**{r['epoch_seconds']:.2f}**" for r in results)
    floor = " | ".join(f"{sum(r['floor'].values()):.2f}" for r in results)
    beyond = " | ".join(f"{extra:.2f}" for _, extra in columns)
    ratio = " | ".join(f"**{r['epoch_seconds'] / sum(r['floor'].values()):.3f}**" for r in results)
    lines += [
        f"| epoch | all of it | {epoch} |",
        f"| epoch | its floor: the denoiser's calls replayed | {floor} |",
        f"| epoch | beyond the floor: every row not marked (floor) | {beyond} |",
        f"| epoch | epoch / floor | {ratio} |",
    ]
    return "\n".join(lines)


def page(keep, path):
    """The kept results' table into the page."""
    results = json.loads(keep.read_text())
    commands = " ; ".join(sorted({r["command"] for r in results}))
    write_block(path, "profile", table(results) + "\n\n" + made_by(commands, results))
    return results


def main(argv=None):
    args = arguments(argv, __doc__)
    if args.report:
        return page(args.keep, args.page)
    result = measure(args)
    print(table([result]))
    keep(args, result, page)
    return result


if __name__ == "__main__":
    main()

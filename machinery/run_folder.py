"""What a training run writes to its folder, and how it stops and resumes:

    config.json           every setting, after presets and defaults, and the run's id (its
                          checkpoints carry it)
    prompts.txt           the prompts it trains on, copied at the start (eval_prompts.txt:
                          --eval-prompts'); resume reads them here
    metrics.jsonl         one line of metrics per epoch (and one for the final evaluation)
    samples/epoch_N.png   the first 16 samples of each epoch, captioned with prompt and reward
    samples/eval_epoch_N.png  the first 16 images of the fixed-noise evaluation after N epochs
                          (--eval-every)
    reward_curve.png      reward mean and spread against reward queries
    checkpoints/epoch_N.pt  what `train.py --resume` needs to continue exactly after epoch N
                          (checkpoints.py)
    lora/ (or unet/)      the trained weights after the last epoch (pipeline.save_weights)

Every file is written aside under a name of this process's own and renamed into place: a rename is
atomic, so a kill at any moment leaves either the old file or the new one, and a write that fails
(a full disk) removes what it wrote aside. One process at a time writes a folder (claim).
"""

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import time

try:
    import fcntl  # POSIX; on Windows a run folder is not locked
except ImportError:
    fcntl = None

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from machinery import parallel
from machinery.checks import check_out
from machinery.config import EVAL_PROMPTS_COPY, LOCK, PROMPTS_COPY, fail, stop
from machinery.pipeline import save_weights
from rewards import to_pil

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@contextlib.contextmanager
def claim(out, resuming, rank, needed):
    """While inside, this process alone writes the run folder: it holds an advisory lock on
    out/.lock, which the kernel releases when the process ends, however it ends (kill -9 included),
    so it never goes stale. A second train.py in the same folder, a new run or a resume, is refused
    in one line and writes nothing; what a killed run left written aside is removed. A full disk
    stops the run in one line (needed: about what an epoch writes, in bytes). Under torchrun rank 0,
    which writes the folder, holds it."""
    if rank:
        yield
        return
    # a folder can refuse what its permissions seemed to allow (a read-only or special file system)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a")
    except OSError as error:
        fail(
            f"--out {out}: the run folder cannot be made there ({error.strerror}); "
            "choose a folder you can write to"
        )
    with handle:
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if resuming:
                fail(
                    f"--resume {out}: that run is still going "
                    f"(another process holds {out / LOCK}); stop it first "
                    "(Ctrl-C, or kill its process), then resume it"
                )
            fail(
                f"--out {out}: another train.py is running in this folder (it holds {out / LOCK}); "
                "choose another --out"
            )
        if not resuming:
            # again, now that it is ours: a run may have begun and ended
            # since the flags were checked
            check_out(out)
        remove_leftovers(out)
        with stopping_on_full_disk(out, needed):
            yield


# no space left, over a quota, over the file-size limit
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FullDisk(Exception):
    """A write into the run folder failed for want of space."""

    def __init__(self, path, code):
        super().__init__(path, code)
        self.path, self.code = path, code


@contextlib.contextmanager
def stopping_on_full_disk(out, needed):
    """A FullDisk inside ends the run with one line: what failed, the space free and needed,
    how to go on."""
    try:
        yield
    except FullDisk as error:
        last = sorted((out / "checkpoints").glob("epoch_*.pt"))
        # it failed first: the folder holds nothing of the run
        if not (out / "config.json").is_file():
            then = "free space, then run the same command again"
        elif last:
            then = (
                f"the last checkpoint ({last[-1].name}) is whole: free space, then continue with: "
                f"python train.py --resume {out}"
            )
        else:
            then = (
                "the run has no checkpoint yet: free space, then start it again from epoch 0 with: "
                f"python train.py --resume {out}"
            )
        stop(
            f"writing {error.path} failed: {os.strerror(error.code)} "
            f"({megabytes(shutil.disk_usage(out).free)} free; "
            f"an epoch writes about {megabytes(needed)}); nothing half-written is left, {then}"
        )


def megabytes(size):
    return f"{size / 2**20:.1f} MB"


def epoch_bytes(params):
    """About what an epoch adds to the run folder before it removes the old: a checkpoint (the
    trainable weights and Adam's two moments), the exported weights, and under 1 MB of images
    and metrics."""
    return 4 * sum(p.nbytes for p in params) + 2**20


def full_disk_errno(error):
    """The errno of a write that failed for want of space, from error or the errors behind it
    (torch.save and safetensors wrap Python's OSError, or give only its number in their
    message); else None."""
    while error is not None:
        codes = (
            [error.errno]
            if isinstance(error, OSError)
            else [int(n) for n in re.findall(r"os error (\d+)", str(error))]
        )
        if FULL_DISK.intersection(codes):
            return FULL_DISK.intersection(codes).pop()
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path, aside=None):
    """Around the writing of path, through the file or folder aside: whatever stops it, aside is
    removed; a write that failed for want of space is raised again as FullDisk(path)."""
    try:
        yield
    except BaseException as error:
        if aside is not None:
            remove(aside)
        code = full_disk_errno(error)
        if code is not None:
            raise FullDisk(path, code) from error
        raise


def remove(path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def aside(path, kind="tmp"):
    """The name path is written under before it is renamed into place: hidden, and this
    process's own."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{kind}{path.suffix}")


# aside()'s names, and those of earlier versions
LEFTOVER = re.compile(r"\.(.+?)\.(\d+\.)?(tmp|new|old)(\.\w+)?")


def remove_leftovers(out):
    """What a killed run left written aside (the lock says no other process is writing): removed,
    but for exported weights it had moved aside and not yet replaced, which go back in place."""
    for folder in (out, out / "checkpoints", out / "samples"):
        for leftover in folder.glob(".*"):
            match = LEFTOVER.fullmatch(leftover.name)
            if match and match[3] == "old" and not (folder / match[1]).exists():
                leftover.rename(folder / match[1])  # killed between export_weights' two renames
            elif match:
                remove(leftover)


def write_config(out, config, prompts, eval_prompts):
    """config.json, and the prompts copied beside it (resume trains on these,
    whatever became of --prompts)."""
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    for name, lines in ((PROMPTS_COPY, prompts), (EVAL_PROMPTS_COPY, eval_prompts)):
        if lines is not None:
            write_atomic(
                out / name,
                lambda tmp: tmp.write_text(
                    "".join(line + "\n" for line in lines), encoding="utf-8"
                ),
            )
    with writing(out / "samples"):
        (out / "samples").mkdir(exist_ok=True)


def update_config(out, **changes):
    """config.json with these settings changed (a resumed run's reward
    file, accepted as it is now)."""
    saved = json.loads((out / "config.json").read_text())
    if any(saved.get(key) != value for key, value in changes.items()):
        write_atomic(
            out / "config.json",
            lambda tmp: tmp.write_text(json.dumps({**saved, **changes}, indent=2)),
        )


def log_epoch(out, cfg, history, pipe, images, prompts, rewards):
    """The epoch's line into metrics.jsonl, its sample grid, the reward curve redrawn, the weights
    exported. Returns the grid's path."""
    write_metrics(out, history)
    captions = [f"{p[:20]}\n{r:.2f}" for p, r in zip(prompts, rewards.tolist())]
    grid = out / "samples" / f"epoch_{history[-1]['epoch']:04d}.png"
    save_grid(images[:16], captions[:16], grid)
    plot_rewards(history, cfg, out / "reward_curve.png")
    export_weights(pipe, out, cfg.lora_rank)
    return grid


def log_final_evaluation(out, cfg, history):
    """The evaluation of the weights a run ends with (history's last row, evaluation.final_row)
    into metrics.jsonl and the reward curve (not to --log-with's tracker: a resumed run's next epoch
    would take its step); returns its console line."""
    write_metrics(out, history)
    plot_rewards(history, cfg, out / "reward_curve.png")
    m = history[-1]
    return (
        f"the final weights (after {m['eval_after_epochs']} epochs), evaluated: "
        f"reward {m['eval_reward_mean']:.3f}"
        + (f" fidelity {m['eval_fidelity']:.3f}" if "eval_fidelity" in m else "")
    )


def final_evaluated(out, epochs):
    """Whether metrics.jsonl ends with the evaluation of a run's final weights
    after `epochs` epochs."""
    lines = (
        (out / "metrics.jsonl").read_text().splitlines()
        if (out / "metrics.jsonl").is_file()
        else []
    )
    return (
        bool(lines)
        and json.loads(lines[-1]).get("eval_after_epochs") == epochs
        and json.loads(lines[-1])["epoch"] == epochs
    )


def export_weights(pipe, out, lora_rank):
    """lora/ (or unet/) by pipeline.save_weights, written into a folder aside, then swapped in: a
    crash leaves the previous epoch's weights whole."""
    final = out / ("unet" if lora_rank == 0 else "lora")
    fresh, old = aside(final), aside(final, "old")
    with writing(final, fresh):
        save_weights(pipe, fresh, lora_rank)
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    remove(old)


def console_line(m, elapsed, left):
    """One epoch's metrics as the line train.py prints, with the time this session has run and an
    estimate of the time left (elapsed and left in seconds)."""
    line = f"epoch {m['epoch']}: reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f}"
    line += (
        " (no spread: every advantage is 0, nothing to learn from)" if m["reward_std"] == 0 else ""
    )
    line += f" fidelity {m['fidelity']:.3f}" if "fidelity" in m else ""
    line += f" | loss {m['loss']:.4g}"
    line += f" kl {m['approx_kl']:.2e} clipfrac {m['clipfrac']:.3f}" if "approx_kl" in m else ""
    line += f" kl_to_base {m['kl_to_base']:.2e}" if "kl_to_base" in m else ""
    line += (
        f" | 90 % of the weight on {m['weight_share']:.0%} of samples"
        if "weight_share" in m
        else ""
    )
    line += f" | eval {m['eval_reward_mean']:.3f}" if "eval_reward_mean" in m else ""
    line += (
        f" | skipped {m['skipped_updates']:g} updates: "
        "non-finite loss or gradient, weights unchanged"
        if m.get("skipped_updates")
        else ""
    )
    line += f" | sample {m['sample_seconds']:.1f}s train {m['train_seconds']:.1f}s"
    return (
        line + f" | {clock(elapsed)} elapsed" + (f", about {clock(left)} left" if left > 0 else "")
    )


def clock(seconds):
    """h:mm:ss, or m:ss under an hour."""
    minutes, seconds = divmod(round(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        if minutes >= 60
        else f"{minutes}:{seconds:02d}"
    )


# seconds of sampling past which an epoch says, after its first batch, how long it will take
LONG_EPOCH = 600


def long_epoch_notice(epoch, start, say, done, total):
    """Beyond the paper: after an epoch's first batch (done of its total trajectories, sampled
    since start), how long its sampling will take, when that is long: a stop request waits for
    the epoch."""
    estimate = (time.time() - start) * total / done
    if estimate > LONG_EPOCH:
        say(
            f"epoch {epoch}: sampling its {total} trajectories will take about "
            f"{estimate / 60:.0f} minutes ({(time.time() - start) / done:.2f} s "
            "each on its first batch), then its training; "
            "a stop request (Ctrl-C, SIGTERM, SIGHUP) takes effect after the epoch"
        )


def write_atomic(path, write):
    """write(tmp_path), flushed to disk, then renamed onto path; on a failure nothing is
    left aside."""
    tmp = aside(path)
    with writing(path, tmp):
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


# exit status of a run stopped cleanly by a signal at a checkpoint: resume it
# (EX_TEMPFAIL, "try again")
STOPPED = 75
# no SIGHUP on Windows
STOP_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
)


@contextlib.contextmanager
def stop_signals(out):
    """Inside it, the first Ctrl-C, a SIGTERM (preemption, time limits) or a SIGHUP (its terminal
    closed) only asks the run to stop: the list it yields is no longer empty, and the loop stops
    after the epoch's checkpoint. A second Ctrl-C stops at once (exit 130), losing only the epoch in
    progress. On the way out the signal handlers are given back and the processes
    leave their group."""
    requested = []

    def on_signal(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(
            f"\n{signal.Signals(signum).name}: stopping after this epoch's checkpoint "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    previous_handlers = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield requested
    except KeyboardInterrupt:
        print(
            "\nstopped during an epoch; its work is lost, the checkpoints before it are not: "
            f"python train.py --resume {out}",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        parallel.teardown()


def write_metrics(out, history):
    """metrics.jsonl, one line an epoch, written whole each time (a failed write never
    leaves half a line)."""
    lines = "".join(json.dumps(m) + "\n" for m in history)
    write_atomic(out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))


def save_grid(images, captions, path, size=128, cols=4):
    """A grid of images, each captioned underneath."""
    pictures = to_pil(images)
    rows = math.ceil(len(pictures) / cols)
    canvas = Image.new("RGB", (cols * size, rows * (size + 28)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (picture, caption) in enumerate(zip(pictures, captions)):
        x, y = (k % cols) * size, (k // cols) * (size + 28)
        canvas.paste(
            picture.resize((size, size), Image.NEAREST if picture.width < size else Image.BILINEAR),
            (x, y),
        )
        draw.text((x + 3, y + size + 2), caption, fill="black")
    write_atomic(path, canvas.save)


def plot_rewards(history, cfg, path):
    """The epochs' mean reward and spread against reward queries, and each evaluation's at the
    queries spent before it (an evaluation before epoch N: N epochs' worth; the final one: all)."""
    # not the final evaluation's row (evaluation.final_row)
    epochs = [m for m in history if "reward_mean" in m]
    queries = [m["reward_queries"] for m in epochs]
    mean, std = (
        np.array([m["reward_mean"] for m in epochs]),
        np.array([m["reward_std"] for m in epochs]),
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # fixed margins: a third faster than bbox_inches="tight"
    fig.subplots_adjust(left=0.15, bottom=0.14, right=0.97, top=0.91)
    ax.plot(queries, mean, marker="o")
    ax.fill_between(
        queries, mean - std, mean + std, alpha=0.25, label="mean ± std over the epoch's samples"
    )
    evaluations = {
        "eval_trained_reward_mean": "evaluation, trained prompts",
        "eval_heldout_reward_mean": "evaluation, held-out prompts",
    }
    if not any("eval_heldout_reward_mean" in m for m in history):
        evaluations = {"eval_reward_mean": "evaluation (fixed noise)"}
    for key, label in evaluations.items():
        points = [
            (m.get("eval_after_epochs", m["epoch"]) * cfg.samples_per_epoch, m[key])
            for m in history
            if key in m
        ]
        if points:
            ax.plot(*zip(*points), marker="s", linestyle="--", label=label)
    # your own reward: its name
    ax.set(
        xlabel="reward queries",
        ylabel=f"reward ({cfg.reward.rpartition(':')[2]})",
        title="training",
    )
    ax.legend(loc="best", fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)

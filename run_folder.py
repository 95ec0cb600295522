"""What a training run writes to its folder, and how it stops and resumes:

    config.json           every setting, after presets and defaults
    metrics.jsonl         one line of metrics per epoch
    samples/epoch_N.png   the first 16 samples of each epoch, captioned with prompt and reward
    samples/eval_epoch_N.png  the first 16 images of the fixed-noise evaluation at epoch N (--eval-every)
    reward_curve.png      reward mean and spread against reward queries
    checkpoints/epoch_N.pt  what `train.py --resume` needs to continue exactly after epoch N
    lora/ (or unet/)      the trained weights after the last epoch (pipeline.save_weights)

Files that a crash must never leave half-written (checkpoints, metrics.jsonl when a resume
rewrites it) are written aside and renamed into place: a rename is atomic, so a kill at any moment
leaves either the old file or the new one.
"""
import contextlib
import json
import math
import os
import pickle
import signal
import sys
from pathlib import Path

try:
    import fcntl  # POSIX; on Windows a run folder is not locked
except ImportError:
    fcntl = None

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

import parallel
from config import LOCK, check_out, fail
from pipeline import save_weights
from rewards import to_pil

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@contextlib.contextmanager
def claim(out, resuming, rank):
    """While inside, this process alone writes the run folder: it holds an advisory lock on out/.lock,
    which the kernel releases when the process ends, however it ends (kill -9 included), so it never
    goes stale. A second train.py in the same folder, a new run or a resume, is refused in one line
    and writes nothing. Under torchrun rank 0, which writes the folder, holds it."""
    if rank or fcntl is None:
        yield
        return
    try:  # a folder can refuse what its permissions seemed to allow (a read-only or special file system)
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a")
    except OSError as error:
        fail(f"--out {out}: the run folder cannot be made there ({error.strerror}); choose a folder you can write to")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if resuming:
                fail(f"--resume {out}: that run is still going (another process holds {out / LOCK}); stop it first "
                     f"(Ctrl-C, or kill its process), then resume it")
            fail(f"--out {out}: another train.py is running in this folder (it holds {out / LOCK}); choose another --out")
        if not resuming:
            check_out(out)  # again, now that it is ours: a run may have begun and ended since the flags were checked
        yield


def write_config(out, config):
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def log_epoch(out, cfg, history, pipe, images, prompts, rewards):
    """Append the last epoch's metrics, draw its sample grid, redraw the reward curve, export the weights."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(history[-1]) + "\n")
    captions = [f"{p[:20]}\n{r:.2f}" for p, r in zip(prompts, rewards.tolist())]
    save_grid(images[:16], captions[:16], out / "samples" / f"epoch_{history[-1]['epoch']:04d}.png")
    plot_rewards(history, cfg.reward, out / "reward_curve.png")
    save_weights(pipe, out, cfg.lora_rank)


def console_line(m):
    """One epoch's metrics as the line train.py prints."""
    line = f"epoch {m['epoch']}: reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f}"
    line += " (no spread: every advantage is 0, nothing to learn from)" if m["reward_std"] == 0 else ""
    line += f" fidelity {m['fidelity']:.3f}" if "fidelity" in m else ""
    line += f" | loss {m['loss']:.4g}"
    line += f" kl {m['approx_kl']:.2e} clipfrac {m['clipfrac']:.3f}" if "approx_kl" in m else ""
    line += f" kl_to_base {m['kl_to_base']:.2e}" if "kl_to_base" in m else ""
    line += f" | 90 % of the weight on {m['weight_share']:.0%} of samples" if "weight_share" in m else ""
    line += f" | eval {m['eval_reward_mean']:.3f}" if "eval_reward_mean" in m else ""
    return line + f" | sample {m['sample_seconds']:.1f}s train {m['train_seconds']:.1f}s"


def write_atomic(path, write):
    """write(tmp_path), flushed to disk, then renamed onto path."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out, state, keep):
    """checkpoints/epoch_N.pt for the state after epoch N (state["epoch"]); the oldest beyond keep go.
    The state holds only tensors and plain Python data, so that it loads with weights_only=True."""
    folder = out / "checkpoints"
    folder.mkdir(exist_ok=True)
    write_atomic(folder / f"epoch_{state['epoch']:04d}.pt", lambda tmp: torch.save(state, tmp))
    for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def checkpoint_due(cfg, epoch, stopping):
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stopping


def checkpoint(out, cfg, history, pipe, optimizer, tracker, rng, generator, device, rank):
    """Everything a resumed run needs after the last epoch: every process hands over its random
    streams, rank 0 writes them with the trainable weights, the optimiser and the reward buffers."""
    streams = parallel.gather_objects([{
        "numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "generator": generator.get_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }])
    if rank == 0:
        trainable = {name for name, p in pipe.unet.named_parameters() if p.requires_grad}
        save_checkpoint(out, {
            "epoch": history[-1]["epoch"], "history": history, "optimizer": optimizer.state_dict(), "rng": streams,
            "trainable": {name: p for name, p in pipe.unet.state_dict().items() if name in trainable},
            "buffers": tracker.state_dict() if tracker is not None else {},
        }, cfg.keep_checkpoints)


def read_checkpoint(cfg, world):
    """The state to resume from, checked before anything is loaded or written; None for a run that
    never reached its first checkpoint (it starts again from epoch 0 with its saved settings)."""
    if not any((Path(cfg.out) / "checkpoints").glob("epoch_*.pt")):
        return None
    state = load_checkpoint(Path(cfg.out))
    if len(state["rng"]) != world:
        fail(f"--resume {cfg.out}: the run was trained by {len(state['rng'])} process(es), not {world}; resume it with as many")
    if len(state["history"]) >= cfg.epochs:
        fail(f"--resume {cfg.out}: the run has done {len(state['history'])} epochs of --epochs {cfg.epochs}; "
             f"give --epochs above {len(state['history'])} to run it further")
    return state


def restore(state, cfg, pipe, optimizer, tracker, rng, generator, rank, device):
    """Everything a fresh run would hold after the checkpoint's epoch: weights, optimiser, reward
    buffers, this process's random streams; its metrics, to which metrics.jsonl is cut back. Without
    a checkpoint, the run as it was before its first epoch: nothing to load, no metrics kept."""
    if state is None:
        if rank == 0:
            cut_metrics(Path(cfg.out), [])
        return []
    pipe.unet.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if tracker is not None:
        tracker.load_state_dict(state["buffers"])
    own = state["rng"][rank]
    rng.bit_generator.state = own["numpy"]
    torch.set_rng_state(own["torch"])
    generator.set_state(own["generator"])
    if own["cuda"] is not None:
        torch.cuda.set_rng_state(own["cuda"], device)
    if rank == 0:
        cut_metrics(Path(cfg.out), state["history"])
    return state["history"]


STOPPED = 75  # exit status of a run stopped cleanly by a signal at a checkpoint: resume it (EX_TEMPFAIL, "try again")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))  # no SIGHUP on Windows


@contextlib.contextmanager
def stop_signals(out):
    """Inside it, the first Ctrl-C, a SIGTERM (preemption, time limits) or a SIGHUP (its terminal
    closed) only asks the run to stop: the list it yields is no longer empty, and the loop stops
    after the epoch's checkpoint. A second Ctrl-C stops at once (exit 130), losing only the epoch in
    progress. On the way out the signal handlers are given back and the processes leave their group."""
    requested = []

    def on_signal(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(f"\n{signal.Signals(signum).name}: stopping after this epoch's checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    previous_handlers = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield requested
    except KeyboardInterrupt:
        print(f"\nstopped during an epoch; its work is lost, the checkpoints before it are not: python train.py --resume {out}", file=sys.stderr)
        sys.exit(130)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        parallel.teardown()


CHECKPOINT_KEYS = {"epoch", "history", "optimizer", "rng", "trainable", "buffers"}


def load_checkpoint(out):
    """The newest readable checkpoint's state. A damaged one is passed over, with a notice, for the
    one before it (the run keeps two for this); one that would need more than tensors and plain
    data to load is refused, since unpickling it could run code (torch.load with weights_only=True)."""
    skipped = []
    for path in sorted((out / "checkpoints").glob("epoch_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Unsupported global" in str(error) or "Unsupported operand" in str(error):
                fail(f"--resume: {path} holds more than tensors and plain data, and loading it could run code; "
                     f"resume only checkpoints written by this train.py")
            state, reason = None, type(error).__name__
        except Exception as error:  # a truncated or corrupted file: torch raises several kinds
            state, reason = None, type(error).__name__
        if state is not None and not (isinstance(state, dict) and CHECKPOINT_KEYS <= set(state)):
            state, reason = None, "not a train.py checkpoint"
        if state is not None:
            for name, reason in skipped:
                print(f"train.py: {name} is unreadable ({reason}); resuming from {path.name}, the newest readable checkpoint", file=sys.stderr)
            return state
        skipped.append((path.name, reason))
    fail(f"--resume {out}: no readable checkpoint ({', '.join(f'{name}: {reason}' for name, reason in skipped)}); "
         f"the run cannot continue: start it again in a new --out with the settings in {out / 'config.json'}")


def cut_metrics(out, history):
    """metrics.jsonl cut back to the epochs of the checkpoint a run resumes from."""
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
        canvas.paste(picture.resize((size, size), Image.NEAREST if picture.width < size else Image.BILINEAR), (x, y))
        draw.text((x + 3, y + size + 2), caption, fill="black")
    canvas.save(path)


def plot_rewards(history, reward, path):
    queries = [m["reward_queries"] for m in history]
    mean, std = np.array([m["reward_mean"] for m in history]), np.array([m["reward_std"] for m in history])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(queries, mean, marker="o")
    ax.fill_between(queries, mean - std, mean + std, alpha=0.25, label="mean ± std over the epoch's samples")
    evaluations = {"eval_trained_reward_mean": "evaluation, trained prompts", "eval_heldout_reward_mean": "evaluation, held-out prompts"}
    if not any("eval_heldout_reward_mean" in m for m in history):
        evaluations = {"eval_reward_mean": "evaluation (fixed noise)"}
    for key, label in evaluations.items():
        points = [(m["reward_queries"], m[key]) for m in history if key in m]
        if points:
            ax.plot(*zip(*points), marker="s", linestyle="--", label=label)
    ax.set(xlabel="reward queries", ylabel=f"reward ({reward})", title="training")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

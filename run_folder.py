"""What a training run writes to its folder, besides the weights (sampler.save_weights):

    config.json           every setting, after presets and defaults
    metrics.jsonl         one line of metrics per epoch
    samples/epoch_N.png   the first 16 samples of each epoch, captioned with prompt and reward
    samples/eval_epoch_N.png  the first 16 images of the fixed-noise evaluation at epoch N (--eval-every)
    reward_curve.png      reward mean and spread against reward queries
    checkpoints/epoch_N.pt  what `train.py --resume` needs to continue exactly after epoch N

Files that a crash must never leave half-written (checkpoints, metrics.jsonl when a resume
rewrites it) are written aside and renamed into place: a rename is atomic, so a kill at any moment
leaves either the old file or the new one.
"""
import json
import math
import os
import pickle
import sys

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

from config import fail
from rewards import to_pil

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def write_config(out, config):
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def log_epoch(out, history, images, captions, reward):
    """Append the last epoch's metrics, draw its sample grid, redraw the reward curve."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(history[-1]) + "\n")
    save_grid(images[:16], captions[:16], out / "samples" / f"epoch_{history[-1]['epoch']:04d}.png")
    plot_rewards(history, reward, out / "reward_curve.png")


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
         f"the run cannot continue: start it again with its flags")


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

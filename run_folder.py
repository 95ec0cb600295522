"""What a training run writes to its folder, besides the weights (sampler.save_weights):

    config.json           every setting, after presets and defaults
    metrics.jsonl         one line of metrics per epoch
    samples/epoch_N.png   the first 16 samples of each epoch, captioned with prompt and reward
    reward_curve.png      reward mean and spread against reward queries
"""
import json
import math

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

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
    ax.set(xlabel="reward queries", ylabel=f"reward ({reward})", title="training")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

"""What each epoch leaves in the run folder besides the checkpoint: its metrics' line, its samples
grid, the reward curve, the trained weights, and the console's line (run_folder.py writes them in
place, atomically).
"""

import json
import math
import time

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from machinery.pipeline import save_weights
from machinery.run_folder import aside, remove, write_atomic, write_metrics, writing
from rewards import to_pil

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


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
        f"the final weights (after {m['eval_after_epochs']} epochs), evaluated: reward "
        f"{m['eval_reward_mean']:.3f}"
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
        f" | skipped {m['skipped_updates']:g} updates: non-finite loss or gradient, weights "
        "unchanged"
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
            f"{estimate / 60:.0f} minutes ({(time.time() - start) / done:.2f} s each on its first "
            "batch), then its training; a stop request (Ctrl-C, SIGTERM, SIGHUP) takes effect "
            "after the epoch"
        )


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

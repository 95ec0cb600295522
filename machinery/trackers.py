"""Beyond the paper: a run you can watch from elsewhere. --log-with tensorboard or wandb sends each
epoch's metrics (metrics.jsonl's numbers), its sample grid and the run's settings to TensorBoard
(RUN/tensorboard: `tensorboard --logdir runs`) or Weights & Biases, as the public DDPO code did (the
PyTorch port logs to wandb, TRL to either through accelerate). A resumed run continues the same
tracker run. Only rank 0 logs. Neither package is needed otherwise: each is imported only when asked
for (config.py refuses a --log-with whose package is not installed, before anything is written).
"""

import contextlib
import dataclasses
import json

import numpy as np
from PIL import Image


@contextlib.contextmanager
def tracking(cfg, out, first_epoch, rank):
    """Yields log(metrics, grid), which sends one epoch: its metrics and its sample grid (a PNG).
    first_epoch: where this session starts (after a resume, the checkpoint's epoch + 1): TensorBoard
    drops what it logged beyond it before the resume, wandb resumes the run of id cfg.run_id."""
    if cfg.log_with == "none" or rank:
        yield lambda metrics, grid: None
    elif cfg.log_with == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(out / "tensorboard", purge_step=first_epoch or None)
        if first_epoch == 0:
            writer.add_text("config", f"```\n{json.dumps(dataclasses.asdict(cfg), indent=2)}\n```")

        def log(metrics, grid):
            for key, value in numbers(metrics).items():
                writer.add_scalar(key, value, metrics["epoch"])
            writer.add_image(
                "samples",
                np.asarray(Image.open(grid).convert("RGB")),
                metrics["epoch"],
                dataformats="HWC",
            )
            writer.flush()  # a run you watch: each epoch on disk as it ends

        try:
            yield log
        finally:
            writer.close()
    else:
        import wandb

        run = wandb.init(
            project="ddpo",
            name=out.name,
            id=cfg.run_id,
            resume="allow",
            dir=out,
            config=dataclasses.asdict(cfg),
        )
        try:
            yield lambda metrics, grid: run.log(
                {**numbers(metrics), "samples": wandb.Image(str(grid))}, step=metrics["epoch"]
            )
        finally:
            run.finish()


def numbers(metrics):
    return {
        key: value
        for key, value in metrics.items()
        if key != "epoch" and isinstance(value, (int, float))
    }

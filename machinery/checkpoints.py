"""Checkpoints: what `train.py --resume` needs to continue a run exactly after epoch N, kept as
checkpoints/epoch_N.pt in its run folder (run_folder.py writes the rest of the folder).

A checkpoint holds the trainable weights (and NFT's sampling policy's), the optimiser, the
per-prompt reward buffers, every process's random streams, the metrics so far, and the run's id
from config.json: resume takes only the folder's own. It holds only tensors and plain Python data,
so that it loads with torch.load(weights_only=True), which runs no code.
"""

import pickle
import sys
from pathlib import Path

import torch

from machinery import parallel
from machinery.errors import fail
from machinery.epoch_log import final_evaluated
from machinery.run_folder import write_atomic, write_metrics, writing


def due(cfg, epoch, stopping):
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stopping


def save(run):
    """Everything a resumed run needs after the last epoch, from a Run (machinery/run.py) by its
    parts' names: every process hands over its random streams (rng, torch's, the sampling
    generator's), rank 0 writes them with the trainable weights of run.pipe, the optimiser, the
    reward buffers (run.tracker) and the history, into run.out."""
    device, unet = run.device, run.pipe.unet
    own = {
        "numpy": run.rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "generator": run.generator.get_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    streams = parallel.gather_objects([own])
    if run.rank == 0:
        trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
        state = {
            "run_id": run.cfg.run_id,
            "epoch": run.history[-1]["epoch"],
            "history": run.history,
            "optimizer": run.optimizer.state_dict(),
            "rng": streams,
            "trainable": {name: p for name, p in unet.state_dict().items() if name in trainable},
            "buffers": run.tracker.state_dict() if run.tracker is not None else {},
            "old_policy": run.old_policy.state_dict() if run.old_policy is not None else {},
        }
        write(run.out, state, run.cfg.keep_checkpoints)


def write(out, state, keep):
    """checkpoints/epoch_N.pt for the state after epoch N (state["epoch"]); the oldest beyond keep
    go. The state holds only tensors and plain Python data, so that it loads with
    weights_only=True."""
    folder = out / "checkpoints"
    with writing(folder):
        folder.mkdir(exist_ok=True)
    write_atomic(folder / f"epoch_{state['epoch']:04d}.pt", lambda tmp: torch_save(state, tmp))
    for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def torch_save(state, path):
    # through a Python file, whose failed write says why (torch's own writer: "basic_ios::clear")
    with open(path, "wb") as f:
        torch.save(state, f)


# what every checkpoint holds (and run_id, since run ids began)
KEYS = {"epoch", "history", "optimizer", "rng", "trainable", "buffers"}


def read(cfg, world):
    """The state to resume from, checked before anything is loaded or written: this run's (its
    run_id), of as many processes, with epochs left to run, or the final weights' evaluation
    (stopped or crashed after its last epoch). None for a run that never reached its first
    checkpoint (it starts again from epoch 0 with its saved settings)."""
    if not any((Path(cfg.out) / "checkpoints").glob("epoch_*.pt")):
        return None
    path, state = load_newest(Path(cfg.out))
    if cfg.run_id is not None and state.get("run_id") != cfg.run_id:
        fail(
            f"--resume {cfg.out}: {path} is another run's checkpoint (run id "
            f"{state.get('run_id')}, this folder's config.json says {cfg.run_id}); remove it from "
            f"{path.parent}, or resume the run it came from"
        )
    if len(state["rng"]) != world:
        fail(
            f"--resume {cfg.out}: the run was trained by {len(state['rng'])} process(es), not "
            f"{world}; resume it with as many"
        )
    if len(state["history"]) >= cfg.epochs and not (
        cfg.eval_every and not final_evaluated(Path(cfg.out), cfg.epochs)
    ):
        fail(
            f"--resume {cfg.out}: the run has done {len(state['history'])} epochs of --epochs "
            f"{cfg.epochs}; give --epochs above {len(state['history'])} to run it further"
        )
    return state


def load_newest(out):
    """The newest readable checkpoint's path and state. A damaged one is passed over, with a notice,
    for the one before it (the run keeps two for this); one that would need more than tensors and
    plain data to load is refused, since unpickling it could run code (torch.load with
    weights_only=True)."""
    skipped = []
    for path in sorted((out / "checkpoints").glob("epoch_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Unsupported global" in str(error) or "Unsupported operand" in str(error):
                fail(
                    f"--resume: {path} holds more than tensors and plain data, and loading it "
                    "could run code; resume only checkpoints written by this train.py"
                )
            state, reason = None, type(error).__name__
        except Exception as error:  # a truncated or corrupted file: torch raises several kinds
            state, reason = None, type(error).__name__
        if state is not None and not (isinstance(state, dict) and KEYS <= set(state)):
            state, reason = None, "not a train.py checkpoint"
        if state is not None:
            for name, reason in skipped:
                print(
                    f"train.py: {name} is unreadable ({reason}); resuming from {path.name}, the "
                    "newest readable checkpoint",
                    file=sys.stderr,
                )
            return path, state
        skipped.append((path.name, reason))
    fail(
        f"--resume {out}: no readable checkpoint "
        f"({', '.join(f'{name}: {reason}' for name, reason in skipped)}); the run cannot "
        f"continue: start it again in a new --out with the settings in {out / 'config.json'}"
    )


def restore(state, run):
    """Everything a fresh Run would hold after the checkpoint's epoch, put into its parts (save's
    names): weights, optimiser, reward buffers, this process's random streams; returns its metrics,
    to which metrics.jsonl is cut back. Without a checkpoint, the run as it was before its first
    epoch: nothing to load, no metrics kept."""
    cfg, pipe, optimizer, tracker = run.cfg, run.pipe, run.optimizer, run.tracker
    rng, generator, rank, device = run.rng, run.generator, run.rank, run.device
    if state is None:
        if rank == 0:
            write_metrics(Path(cfg.out), [])
        return []
    trainable = {
        name: tuple(p.shape) for name, p in pipe.unet.named_parameters() if p.requires_grad
    }
    saved = {name: tuple(t.shape) for name, t in state["trainable"].items()}
    if saved != trainable:
        name = next(
            name
            for name in sorted(set(saved) | set(trainable))
            if saved.get(name) != trainable.get(name)
        )
        fail(
            f"--resume {cfg.out}: its checkpoint's weights do not fit the model that config.json "
            f"makes ({name}: {saved.get(name, 'absent')} in the checkpoint, "
            f"{trainable.get(name, 'absent')} in the model; another --lora-rank or --model); "
            "restore config.json from a copy, or resume the run the checkpoint came from"
        )
    pipe.unet.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if tracker is not None:
        tracker.load_state_dict(state["buffers"])
    if run.old_policy is not None:  # --algo nft's sampling policy
        run.old_policy.load_state_dict(state["old_policy"])
    own = state["rng"][rank]
    rng.bit_generator.state = own["numpy"]
    torch.set_rng_state(own["torch"])
    generator.set_state(own["generator"])
    if own["cuda"] is not None:
        torch.cuda.set_rng_state(own["cuda"], device)
    if rank == 0:
        write_metrics(Path(cfg.out), state["history"])  # cut back to the checkpoint's epochs
    return state["history"]

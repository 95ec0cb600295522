"""Do two revisions of the code train the same, bit for bit? For a restructuring that must change no
output. Each revision is checked out in a worktree of its own (under --work); there, short runs
(RUNS: 2 epochs of the bundled model's preset, seed 3) go through its train.py, single-threaded,
--jobs at a time: every algorithm (PXPO with both normalisations), the KL leash with fused steps,
the evaluation, the successors' options together, tiny random-weight SD 2.x and SDXL pipelines
(built once, from configs, for both sides), the bundled flow model (SD3's shape, Flow-GRPO's step),
two rewards summed (--rewards, one of them your own file's), a reward served by the side's own
reward_server.py, a run resumed after its first epoch, and a run of two processes under torchrun. Then what the two wrote is compared: metrics.jsonl (every value but the
timings, and the keys' order), the saved LoRA files byte for byte, and the last checkpoint's state
(weights, optimiser, random streams, reward buffers, the history without timings).

    python benchmarks/same_outputs.py dc01ac8 943cad5 --jobs 2   # the restructuring of train.py

Prints one line a run and exits 1 if anything differs. Same machine only: another CPU may round
differently, and over epochs the runs part.
"""

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("sample_seconds", "train_seconds", "eval_seconds")
TINY = "--num-steps 4 --samples-per-epoch 8 --batch-size 2 --prompts simple_animals"  # for the tiny SD 2.x and SDXL pipelines
RUNS = {
    "ddpo-is": "--algo ddpo-is",
    "ddpo-is-leash-fused": "--algo ddpo-is --kl-coef 0.01 --steps-per-forward 3",
    "ddpo-is-fused-eval": "--algo ddpo-is --steps-per-forward 2 --eval-every 1 --prompts shapes_train --eval-prompts shapes --eval-samples 16",
    "ddpo-sf": "--algo ddpo-sf",
    "rwr": "--algo rwr",
    "rwr-sparse": "--algo rwr-sparse",
    "pxpo": "--algo pxpo --reward pixel_background",
    "pxpo-position": "--algo pxpo --reward pixel_background --pxpo-normalise position",
    "successors": "--samples-per-prompt 4 --advantages group --shared-noise --train-window 5 --eval-num-steps 10 --eval-every 1 --eval-samples 8",
    "sd2": f"--model {{models}}/sd2 {TINY}",
    "sdxl": f"--model {{models}}/sdxl {TINY}",
    "flow": "--model toy_world/tiny-flow --algo ddpo-is --kl-coef 0.01",
    "rewards": "--rewards jpeg=1 examples/brightness.py:brightness=0.5",
    "served": "--reward http://127.0.0.1:{port}/",  # the side's own reward_server.py, jpeg
    "resumed": "--algo ddpo-is",  # its first epoch, then --resume for the rest
    "torchrun": "--algo ddpo-is --device cpu --batch-size 8",  # two processes, gloo; 64 samples = 2 x 4 updates x 8
}


def build_models(work):
    """The tiny SD 2.x and SDXL pipelines both sides train, built once from configs (no download)."""
    sys.path.insert(0, str(ROOT))
    from toy_world.pretrain import build_pipeline

    for family in ("sd2", "sdxl"):
        if not (work / "models" / family / "model_index.json").is_file():
            build_pipeline(
                image_size=16,
                vae_channels=(16, 32),
                unet_channels=(32,),
                text_dim=32,
                max_length=16,
                seed=0,
                family=family,
            ).save_pretrained(work / "models" / family)


@contextlib.contextmanager
def served(tree, env):
    """The side's own reward_server.py serving jpeg on a free port, for the time of a run."""
    server = subprocess.Popen(
        [sys.executable, "reward_server.py", "--reward", "jpeg", "--port", "0"],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()  # reward_server.py: serving jpeg on http://HOST:PORT/ (cpu)
        yield int(line.split("http://", 1)[1].split("/", 1)[0].rpartition(":")[2])
    finally:
        server.terminate()
        server.wait()


def train(tree, name, out, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if name == "served":
        with served(tree, env) as port:
            return run_train(tree, name, out, args, env, port)
    return run_train(tree, name, out, args, env)


def run_train(tree, name, out, args, env, port=None):
    flags = shlex.split(RUNS[name].format(models=args.work_models, port=port)) + [
        "--seed",
        "3",
        "--out",
        str(out),
        *shlex.split(args.train_args),
    ]
    if name == "torchrun":
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "train.py",
        ]
    else:
        launch = [sys.executable, "train.py"]
    if name == "resumed":
        subprocess.run(
            [*launch, *flags, "--epochs", "1"],
            cwd=tree,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        flags = ["--resume", str(out)]
    subprocess.run(
        [*launch, *flags, "--epochs", str(args.epochs)],
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def same(a, b):
    """Equal values, tensors bit for bit; a dict's keys in any order (the reward buffers fill in the
    order of a set of prompts, which differs from process to process)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
        )
    return a == b


def written(out):
    """What a run wrote, timings and run id left out: its metrics (as (key, value) pairs: their order
    counts), its LoRA files' bytes, its last checkpoint's state."""
    metrics = [
        list({k: v for k, v in json.loads(line).items() if k not in TIMING}.items())
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    lora = {p.name: p.read_bytes() for p in sorted((out / "lora").iterdir())}
    state = torch.load(sorted((out / "checkpoints").glob("epoch_*.pt"))[-1], weights_only=True)
    state["history"] = [{k: v for k, v in m.items() if k not in TIMING} for m in state["history"]]
    state.pop("run_id", None)
    return {"metrics": metrics, "lora": lora, "checkpoint": state}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", help="a git revision")
    parser.add_argument("after", help="another git revision")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--train-args", default="", help="more train.py flags for every run, quoted"
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--work", type=Path, help="where the worktrees and runs go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="same-outputs-"))
    args.work_models = work / "models"
    if {"sd2", "sdxl"} & set(args.runs):
        build_models(work)
    trees = {}
    for side in ("before", "after"):
        trees[side] = work / side
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "worktree",
                "add",
                "--detach",
                "--force",
                str(trees[side]),
                getattr(args, side),
            ],
            check=True,
            capture_output=True,
        )
    try:
        tasks = [(side, name) for name in args.runs for side in trees]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(
                pool.map(
                    lambda task: train(
                        trees[task[0]], task[1], work / "runs" / task[0] / task[1], args
                    ),
                    tasks,
                )
            )
        differ = []
        for name in args.runs:
            before, after = (written(work / "runs" / side / name) for side in trees)
            verdict = {part: same(before[part], after[part]) for part in before}
            print(
                f"{name:20s} "
                + "  ".join(
                    f"{part} {'identical' if ok else 'DIFFER'}" for part, ok in verdict.items()
                )
            )
            differ += [name] if not all(verdict.values()) else []
    finally:
        for tree in trees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )
    print(
        f"{args.before} and {args.after}: "
        + (f"{', '.join(differ)} differ" if differ else "every run identical")
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

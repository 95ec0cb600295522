"""Data parallel training under torchrun, on the CPU with gloo: two processes, one run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from machinery import parallel
from machinery.prompts import PROMPT_SETS

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_write_one_run_folder_and_sigterm_stops_both_after_a_checkpointed_epoch(
    tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "train.py"),
        "--model",
        str(tiny_pipeline_dir),
        "--device",
        "cpu",
        "--epochs",
        "50",
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "2",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
        "--seed",
        "3",
        "--keep-checkpoints",
        "50",
        "--out",
        str(out),
    ]
    torchrun = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    while (
        not (
            (out / "metrics.jsonl").is_file()
            and (out / "metrics.jsonl").read_text().count("\n") >= 1
        )
        and time.time() < deadline
    ):
        time.sleep(0.2)
    torchrun.send_signal(signal.SIGTERM)  # what a cluster does at preemption or a time limit
    stdout, stderr = torchrun.communicate(timeout=120)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(metrics) < 50 and "stopped after epoch" in stdout, stderr[-3000:]
    assert (
        sorted(out.glob("checkpoints/*.pt"))[-1].name == f"epoch_{len(metrics) - 1:04d}.pt"
    )  # the last logged epoch is checkpointed
    assert [m["reward_queries"] for m in metrics] == [
        8 * (epoch + 1) for epoch in range(len(metrics))
    ]  # one writer, whole epochs counted
    assert stdout.count("epoch 0:") == 1  # only rank 0 reports
    state = torch.load(out / "checkpoints" / "epoch_0000.pt", weights_only=False)
    assert len(state["rng"]) == 2  # each process's random state, for --resume
    # the tracker saw all 8 rewards of epoch 0: rank r drew its 4 prompts with seed 3 + r * SEED_STRIDE
    prompt_set = PROMPT_SETS["simple_animals"]()
    drawn = Counter()
    for rank in range(2):
        rng = np.random.default_rng(3 + rank * parallel.SEED_STRIDE)
        drawn.update(prompt_set[i] for i in rng.integers(len(prompt_set), size=4))
    assert {prompt: len(values) for prompt, values in state["buffers"].items()} == dict(drawn)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.json",
        "lora",
        "metrics.jsonl",
        "prompts.txt",
        "reward_curve.png",
        "samples",
    ]
    alone = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--resume", str(out), "--epochs", "60"],
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 2 and "trained by 2 process(es), not 1" in alone.stderr


def exchange(rank, world, init_file, results):
    """One process of test_two_processes_gather_and_average: what each helper returns on it."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), float(rank + 1))
    parallel.average_gradients([param])
    results[rank] = {
        "gather": parallel.gather(torch.tensor([rank, 10 + rank])).tolist(),
        "objects": parallel.gather_objects([f"prompt {rank}"]),
        "grad": param.grad.tolist(),
        "mean": parallel.mean_over_processes({"loss": float(rank)}),
        "any": parallel.any_process(rank == 1),
    }
    torch.distributed.destroy_process_group()


def test_two_processes_gather_in_rank_order_and_average_gradients(tmp_path):
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(exchange, args=(2, tmp_path / "init", results), nprocs=2)
    for rank in range(2):
        assert results[rank] == {
            "gather": [0, 10, 1, 11],
            "objects": ["prompt 0", "prompt 1"],
            "grad": [1.5] * 3,
            "mean": {"loss": 0.5},
            "any": True,
        }


def test_without_torchrun_every_helper_is_the_identity():
    values = torch.arange(4.0)
    assert parallel.gather(values) is values
    assert parallel.gather_objects(("a", "b")) == ["a", "b"]
    assert parallel.mean_over_processes({"loss": 0.5}) == {"loss": 0.5}
    assert parallel.any_process(True) and not parallel.any_process(False)

"""One train.py a run folder: while a process holds the folder's lock, a second run or a resume of it
is refused in one line (exit 2) and writes nothing; a holder killed with kill -9 leaves no stale lock."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from machinery import run_folder
import train

ROOT = Path(__file__).resolve().parents[1]
# another process that takes the folder's lock as train.py does, says so, and holds it until killed
HOLDER = """import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(600)
"""


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.skipif(run_folder.fcntl is None, reason="advisory locks need POSIX")
def test_a_live_run_refuses_a_resume_and_a_killed_holder_leaves_no_stale_lock(
    tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_pipeline_dir),
        "--samples-per-epoch",
        "4",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
    ]
    train.main([*args, "--out", str(out), "--epochs", "1"])
    capsys.readouterr()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / run_folder.LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        with pytest.raises(SystemExit) as exit:
            train.main(["--resume", str(out), "--epochs", "2"])
        error = capsys.readouterr().err.strip().splitlines()
        assert (
            exit.value.code == 2
            and len(error) == 1
            and "still going" in error[0]
            and str(out) in error[0]
        ), error
        assert snapshot(out) == before  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.main(
        ["--resume", str(out), "--epochs", "2"]
    )  # the kernel released the killed holder's lock
    assert [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [0, 1]


@pytest.mark.skipif(run_folder.fcntl is None, reason="advisory locks need POSIX")
def test_a_new_run_in_a_folder_another_process_holds_is_refused_and_writes_nothing(
    tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / run_folder.LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert (
            holder.stdout.readline().strip() == "held"
        )  # a run that has taken the folder and not yet written into it
        with pytest.raises(SystemExit) as exit:
            train.main(
                [
                    "--model",
                    str(tiny_pipeline_dir),
                    "--out",
                    str(out),
                    "--samples-per-epoch",
                    "4",
                    "--batch-size",
                    "2",
                    "--updates-per-epoch",
                    "1",
                    "--num-steps",
                    "2",
                    "--prompts",
                    "simple_animals",
                    "--epochs",
                    "1",
                ]
            )
        error = capsys.readouterr().err.strip().splitlines()
        assert (
            exit.value.code == 2 and len(error) == 1 and "another train.py is running" in error[0]
        ), error
        assert [p.name for p in out.iterdir()] == [run_folder.LOCK]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.skipif(run_folder.fcntl is None, reason="advisory locks need POSIX")
def test_two_runs_started_at_once_in_one_folder_leave_one_run(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        str(tiny_pipeline_dir),
        "--out",
        str(out),
        "--samples-per-epoch",
        "4",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
        "--epochs",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    results = sorted((run.returncode, error.strip()) for run, error in zip(runs, errors))
    assert [status for status, _ in results] == [0, 2], results
    error = results[1][1].splitlines()
    assert len(error) == 1 and f"--out {out}" in error[0], (
        error
    )  # the lock's line, or "not empty" if the first had already written
    assert [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [0]  # one run's epoch, once


def test_what_a_killed_run_left_aside_is_removed_when_its_folder_is_next_claimed(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # a user's own files stay
    (out / ".mine").write_text("mine")
    (out / "checkpoints" / ".epoch_0003.4242.tmp.pt").write_bytes(b"half a checkpoint")
    (out / ".lora.4242.tmp").mkdir()  # the new weights, half written
    (out / ".lora.4242.old").mkdir()  # the last epoch's, moved aside just before it was killed
    (out / ".lora.4242.old" / "weights").write_text("the last epoch's")
    with run_folder.claim(out, resuming=True, rank=0, needed=0):
        pass
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        ".lock",
        ".mine",
        "checkpoints",
        "config.json",
        "lora",
        "lora/weights",
        "notes.txt",
    ]
    assert (out / "lora" / "weights").read_text() == "the last epoch's"

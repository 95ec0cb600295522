"""A full disk at any write stops the run in one line naming the file, removes what it wrote aside,
and leaves the last checkpoint whole, so that --resume continues exactly once space is freed."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from machinery import run_folder
import train

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("sample_seconds", "train_seconds")


def can_mount_tmpfs():
    """A small tmpfs of our own, in a user and mount namespace (unshare -rm), where the machine allows it."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    script = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
    return (
        subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True).returncode == 0
    )


@pytest.fixture
def run_args(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return [
        "--model",
        str(tiny_pipeline_dir),
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "2",
        "--num-steps",
        "2",
        "--prompts",
        str(prompts),
        "--lr",
        "1e-2",
        "--min-count",
        "4",
        "--buffer-size",
        "6",
    ]


def metrics(out):
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def same_run(a, b):
    """The same epochs and values (to float rounding: the run in a subprocess may use other threads)."""
    return len(a) == len(b) and all(x == pytest.approx(y, rel=1e-5) for x, y in zip(a, b))


def written_aside(out):
    return [
        str(p.relative_to(out)) for p in out.rglob(".*") if run_folder.LEFTOVER.fullmatch(p.name)
    ]


@pytest.mark.skipif(
    not can_mount_tmpfs(), reason="needs unshare -rm and tmpfs mounts (Linux user namespaces)"
)
def test_a_full_disk_stops_in_one_line_leaves_nothing_aside_and_resume_continues_exactly_once_space_is_freed(
    run_args, tmp_path
):
    straight = tmp_path / "straight"
    train.main([*run_args, "--out", str(straight), "--epochs", "3"])
    # a disk that holds the first epoch's files and not the second's, in a mount namespace of its own
    first_epoch = [
        straight / "checkpoints" / "epoch_0002.pt",
        *(straight / "lora").iterdir(),
        straight / "samples" / "epoch_0000.png",
        straight / "reward_curve.png",
        straight / "config.json",
        straight / "metrics.jsonl",
    ]
    size = sum(p.stat().st_size for p in first_epoch) * 3 // 2 // 4096 * 4096
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    train_py = f"{sys.executable} {ROOT / 'train.py'}"
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {ROOT} && "
        f"{{ {train_py} {' '.join(run_args)} --out {out} --epochs 3; echo $? > {tmp_path / 'status'}; }} && "
        f"{sys.executable} -c 'import json, sys, pathlib; out = pathlib.Path(sys.argv[1]); "
        f'json.dump(sorted(str(p.relative_to(out)) for p in out.rglob("*")), open(sys.argv[2], "w"))\' {out} {tmp_path / "files.json"} && '
        f"cp {out / 'metrics.jsonl'} {tmp_path / 'metrics_when_full.jsonl'} && "
        f"mount -o remount,size={size * 8} {disk} && {train_py} --resume {out} && cp {out / 'metrics.jsonl'} {tmp_path / 'metrics.jsonl'}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "status").read_text().strip() == "1"
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert "No space left on device" in line and "MB free" in line and f"--resume {out}" in line, (
        line
    )
    files = json.loads((tmp_path / "files.json").read_text())
    assert not [name for name in files if run_folder.LEFTOVER.fullmatch(Path(name).name)], (
        files
    )  # nothing left aside
    assert "checkpoints/epoch_0000.pt" in files  # the first epoch fitted
    assert same_run(metrics(tmp_path), metrics(straight))


def test_a_write_the_file_system_refuses_stops_in_one_line_and_the_run_starts_again_once_it_fits(
    run_args, tmp_path
):
    """Over the file-size limit (RLIMIT_FSIZE: the system's EFBIG, raised through torch.save's and
    safetensors' own errors as a full disk's ENOSPC is): a file too large to write in the first epoch."""
    out = tmp_path / "run"
    train.main([*run_args, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    checkpoint = (tmp_path / "straight" / "checkpoints" / "epoch_0001.pt").stat().st_size
    limit = (
        checkpoint * 2 // 3
    )  # the checkpoint (and perhaps the LoRA) cannot be written; the small files can

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *run_args,
        "--out",
        str(out),
        "--epochs",
        "2",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        preexec_fn=limited,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert "File too large" in line and "no checkpoint yet" in line and f"--resume {out}" in line, (
        line
    )
    assert not written_aside(out) and not list((out / "checkpoints").glob("*.pt"))
    train.main(
        ["--resume", str(out)]
    )  # the limit gone: the run starts again from epoch 0 with its settings
    assert same_run(metrics(out), metrics(tmp_path / "straight"))

"""--log-with: each epoch's metrics, its sample grid and the settings reach the tracker, read back
from what it wrote; a resumed run continues the same tracker run without doubled epochs."""

import importlib.util
import json

import pytest

import machinery.run
import train

TINY = [
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


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed"
)
def test_tensorboard_gets_every_epochs_metrics_and_grid_once_across_a_resume(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            *TINY,
            "--out",
            str(out),
            "--epochs",
            "2",
            "--log-with",
            "tensorboard",
        ]
    )
    # a crash after epoch 2 was logged but before its checkpoint landed: the resume does epoch 2 again
    monkeypatch.setattr(machinery.run.checkpoints, "due", lambda cfg, epoch, stopping: epoch < 2)
    train.main(["--resume", str(out), "--epochs", "3"])
    monkeypatch.undo()
    train.main(["--resume", str(out), "--epochs", "4"])
    events = EventAccumulator(
        str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    ).Reload()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("reward_mean")] == [
        0,
        1,
        2,
        3,
    ]  # epoch 2 once: what the crash left was purged
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx(
        [m["reward_mean"] for m in metrics]
    )
    assert {"loss", "approx_kl", "clipfrac", "sample_seconds"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples")] == [0, 1, 2, 3]
    assert "config" in "".join(events.Tags()["tensors"])  # the settings, as text


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args),
    )
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "run"), "--log-with", "wandb"])
    error = capsys.readouterr().err.strip()
    assert (
        exit.value.code == 2 and "pip install wandb" in error and not (tmp_path / "run").exists()
    ), error


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_gets_the_run_under_its_id_and_a_resume_continues_it(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            *TINY,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--log-with",
            "wandb",
        ]
    )
    train.main(["--resume", str(out), "--epochs", "2"])
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), (
        runs
    )  # both sessions, one run id
    assert all(any((out / "wandb" / name).glob("*.wandb")) for name in runs)

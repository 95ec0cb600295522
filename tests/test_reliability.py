"""Reliability (issue 7): exact resume, checkpoints that survive a crash, Ctrl-C, non-finite
values that never reach the weights, and bad input refused before anything is written."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from machinery import checkpoints
from machinery import epoch_log, run_folder
import machinery.run
import train
import rewards

TIMING = ("sample_seconds", "train_seconds", "eval_seconds")


@pytest.fixture
def run_args(tiny_pipeline_dir, tmp_path):
    """A tiny run whose two prompts repeat, so the per-prompt reward buffers fill and matter."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return lambda out, epochs: [
        "--model",
        str(tiny_pipeline_dir),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "2",
        "--num-steps",
        "4",
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
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--kl-coef", "0.5", "--eval-every", "1", "--eval-samples", "3"],
        ["--algo", "pxpo", "--reward", "pixel_color", "--pxpo-normalise", "position"],
    ],
    ids=["plain", "kl-and-eval", "pxpo-per-position-buffers"],
)
def test_a_resumed_run_writes_the_same_metrics_as_an_uninterrupted_one(extra, run_args, tmp_path):
    train.main(run_args(tmp_path / "straight", 3) + extra)
    train.main(
        run_args(tmp_path / "resumed", 2) + extra
    )  # 16 samples of 2 prompts by then: the buffers (--min-count 4) are in use
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "3"])
    straight = metrics(tmp_path / "straight")
    assert len(straight) == (4 if "--eval-every" in extra else 3)
    assert all(("eval_kl_to_base" in m) == ("--eval-every" in extra) for m in straight)
    if (
        "--eval-every" in extra
    ):  # the weights each evaluation saw; the last row the final weights', the resumed run's new ones
        assert [m["eval_after_epochs"] for m in straight] == [
            0,
            1,
            2,
            3,
        ] and "reward_mean" not in straight[-1]
    assert metrics(tmp_path / "resumed") == straight  # every value but the wall-clock times


def test_a_run_that_dies_before_its_final_evaluation_resumes_to_evaluate_the_weights_it_ended_with(
    run_args, tmp_path, monkeypatch
):
    extra = ["--eval-every", "1", "--eval-samples", "3"]
    train.main(run_args(tmp_path / "straight", 2) + extra)
    evaluate = machinery.run.evaluate

    def die_at_the_end(
        cfg, *args
    ):  # the final weights' evaluation never lands (a kill, a stop signal's exit)
        if args[-1] == cfg.epochs:
            raise SystemExit(137)
        return evaluate(cfg, *args)

    monkeypatch.setattr(machinery.run, "evaluate", die_at_the_end)
    with pytest.raises(SystemExit):
        train.main(run_args(tmp_path / "died", 2) + extra)
    monkeypatch.undo()
    assert len(metrics(tmp_path / "died")) == 2  # both epochs, no final row
    train.main(["--resume", str(tmp_path / "died")])  # no epoch left to run: only the evaluation
    assert metrics(tmp_path / "died") == metrics(tmp_path / "straight")
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(tmp_path / "died")])
    assert exit.value.code == 2  # now nothing is left to do


def test_checkpoints_keep_the_latest_ones(run_args, tmp_path):
    train.main(run_args(tmp_path / "run", 4) + ["--keep-checkpoints", "2"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch_0002.pt",
        "epoch_0003.pt",
    ]


def test_a_crash_while_saving_a_checkpoint_leaves_a_run_that_resumes_exactly(
    run_args, tmp_path, monkeypatch
):
    train.main(run_args(tmp_path / "straight", 3))
    real_save = torch.save

    def crash_in_the_middle(
        state, f
    ):  # epoch 1's checkpoint: half a file on disk, then the process dies
        real_save(state, f)
        if state["epoch"] == 1:
            f.truncate(f.tell() // 2)
            raise SystemExit(137)

    monkeypatch.setattr(checkpoints.torch, "save", crash_in_the_middle)
    with pytest.raises(SystemExit):
        train.main(run_args(tmp_path / "crashed", 3))
    monkeypatch.undo()
    assert (
        len(metrics(tmp_path / "crashed")) == 2
    )  # epoch 1 was logged, but its checkpoint never landed
    assert [p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()] == [
        "epoch_0000.pt"
    ]  # its half is gone
    train.main(["--resume", str(tmp_path / "crashed")])
    assert metrics(tmp_path / "crashed") == metrics(tmp_path / "straight")


def test_a_run_that_dies_before_its_first_checkpoint_resumes_from_epoch_0_as_a_new_run(
    run_args, tmp_path, monkeypatch, capsys
):
    train.main(run_args(tmp_path / "straight", 2))

    def die_while_saving(state, path):  # the first checkpoint never lands (a full disk, a kill)
        raise SystemExit(137)

    monkeypatch.setattr(checkpoints.torch, "save", die_while_saving)
    with pytest.raises(SystemExit):
        train.main(run_args(tmp_path / "died", 2))
    monkeypatch.undo()
    assert (tmp_path / "died" / "config.json").is_file()
    assert (
        not any((tmp_path / "died" / "checkpoints").glob("*.pt"))
        and len(metrics(tmp_path / "died")) == 1
    )
    capsys.readouterr()
    train.main(
        ["--resume", str(tmp_path / "died")]
    )  # what every message suggests, from this state too
    assert "starts again from epoch 0" in capsys.readouterr().out
    assert metrics(tmp_path / "died") == metrics(tmp_path / "straight")


@pytest.mark.parametrize("signum", run_folder.STOP_SIGNALS)
def test_ctrl_c_sigterm_or_sighup_stops_after_the_epoch_and_says_how_to_resume(
    signum, run_args, tmp_path, monkeypatch, capsys
):
    jpeg = rewards.jpeg_compressibility

    def reward_then_signal(images, prompts):
        os.kill(os.getpid(), signum)
        return jpeg(images, prompts)

    monkeypatch.setattr(rewards, "jpeg_compressibility", reward_then_signal)
    handlers = {s: signal.getsignal(s) for s in run_folder.STOP_SIGNALS}
    with pytest.raises(SystemExit) as exit:
        train.main(run_args(tmp_path / "run", 5))
    assert exit.value.code == run_folder.STOPPED
    assert (
        len(metrics(tmp_path / "run")) == 1
        and (tmp_path / "run" / "checkpoints" / "epoch_0000.pt").is_file()
    )
    assert f"--resume {tmp_path / 'run'}" in capsys.readouterr().out
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are given back


def test_a_non_finite_reward_stops_the_run_before_it_is_trained_on_or_saved(
    run_args, tmp_path, monkeypatch, capsys
):
    jpeg, calls = rewards.jpeg_compressibility, []

    def nan_on_second_epoch(images, prompts):
        calls.append(1)
        rewards = jpeg(images, prompts)
        return rewards * float("nan") if len(calls) == 2 else rewards

    monkeypatch.setattr(rewards, "jpeg_compressibility", nan_on_second_epoch)
    with pytest.raises(SystemExit) as exit:
        train.main(run_args(tmp_path / "run", 3))
    assert exit.value.code == 1 and "non-finite" in capsys.readouterr().err
    assert len(metrics(tmp_path / "run")) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch_0000.pt"]


def test_a_non_finite_loss_skips_the_update_and_never_reaches_the_weights(
    run_args, tmp_path, monkeypatch, capsys
):
    real_loss = train.ddpo.ddpo_is_loss
    monkeypatch.setattr(train.ddpo, "ddpo_is_loss", lambda *args: real_loss(*args) * float("nan"))
    history = train.main(run_args(tmp_path / "run", 1))
    assert history[0]["skipped_updates"] == 4  # every one of the epoch's updates
    said = capsys.readouterr()
    assert (
        said.out.count("skipped 4 updates") == 1 and "skipped" not in said.err
    )  # once, in the epoch's own line
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_0000.pt", weights_only=False)
    ups = [v for k, v in state["trainable"].items() if "lora_B" in k]
    assert ups and all(
        torch.equal(v, torch.zeros_like(v)) for v in ups
    )  # untouched since the init (B = 0)
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--reward", "nonsense"),
        ("--algo", "ppo"),
        ("--eta", "0"),
        ("--eta", "-1"),
        ("--num-steps", "0"),
        ("--epochs", "0"),
        ("--epochs", "-3"),
        ("--batch-size", "0"),
        ("--clip-range", "-1"),
        ("--clip-range", "0"),
        ("--lr", "0"),
        ("--lr", "-1e-4"),
        ("--updates-per-epoch", "0"),
        ("--lora-rank", "-1"),
        ("--samples-per-epoch", "7"),
        ("--timestep-fraction", "0"),
        ("--timestep-fraction", "1.5"),
        ("--lr", "nan"),
        ("--clip-range", "inf"),
        ("--guidance-scale", "-inf"),
        ("--beta", "0"),
        ("--target-color", "red"),
        ("--target-color", "1,1"),
        ("--target-color", "2,0,0"),
        ("--checkpoint-every", "0"),
        ("--keep-checkpoints", "0"),
        ("--prompts", "no_such_file.txt"),
        ("--model", "no_such_folder/"),
        ("--model", "no-such/model"),
        ("--mixed-precision", "fp16"),
        ("--resume", "no_such_run"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_flag(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        train.main(
            ["--out", str(out), "--device", "cpu", flag, value]
            if flag != "--resume"
            else [flag, str(tmp_path / value)]
        )
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error
    assert not out.exists() and not (tmp_path / "no_such_run").exists()


def test_an_empty_prompts_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "run"), "--device", "cpu", "--prompts", str(empty)])
    assert (
        exit.value.code == 2
        and "--prompts" in capsys.readouterr().err
        and not (tmp_path / "run").exists()
    )


def test_an_existing_run_is_never_overwritten_and_resume_takes_no_other_settings(
    run_args, tmp_path, capsys
):
    train.main(run_args(tmp_path / "run", 1))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    for argv in (run_args(tmp_path / "run", 2), ["--resume", str(tmp_path / "run"), "--lr", "1"]):
        with pytest.raises(SystemExit) as exit:
            train.main(argv)
        error = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and len(error.splitlines()) == 1 and "--resume" in error
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(empty)])
    assert exit.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_a_damaged_latest_checkpoint_gives_way_to_the_one_before_it(run_args, tmp_path, capsys):
    train.main(run_args(tmp_path / "straight", 3))
    train.main(run_args(tmp_path / "damaged", 3))
    latest = tmp_path / "damaged" / "checkpoints" / "epoch_0002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "damaged"), "--epochs", "3"])
    notice = capsys.readouterr().err.strip()
    assert (
        len(notice.splitlines()) == 1
        and "epoch_0002.pt is unreadable" in notice
        and "epoch_0001.pt" in notice
    )
    assert metrics(tmp_path / "damaged") == metrics(
        tmp_path / "straight"
    )  # epoch 2 done again, exactly


def test_an_epoch_whose_rewards_have_no_spread_says_so_in_its_line(
    run_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        rewards, "jpeg_compressibility", lambda images, prompts: torch.zeros(len(prompts))
    )
    history = train.main(run_args(tmp_path / "run", 1))
    assert history[0]["reward_std"] == 0 and metrics(tmp_path / "run")[0]["reward_std"] == 0
    assert "no spread" in capsys.readouterr().out
    assert (
        history[0]["loss"] == 0 and history[0]["approx_kl"] == 0
    )  # zero advantages: a zero loss, the ratio still 1


def with_prompts(args, prompts):
    args = list(args)
    args[args.index("--prompts") + 1] = str(prompts)
    return args


def test_a_resumed_run_trains_on_the_prompts_it_started_with_whatever_became_of_their_file(
    run_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    Path("animals.txt").write_text("a cat\na dog\n")  # given by a relative path
    train.main(with_prompts(run_args(tmp_path / "straight", 2), "animals.txt"))
    train.main(with_prompts(run_args(tmp_path / "resumed", 1), "animals.txt"))
    Path("animals.txt").write_text("a fish\n")  # edited after the run began
    monkeypatch.chdir(
        (tmp_path / "elsewhere").mkdir() or tmp_path / "elsewhere"
    )  # and resumed from another directory
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    assert "2 prompts" in capsys.readouterr().out
    assert (tmp_path / "resumed" / "prompts.txt").read_text() == "a cat\na dog\n"
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_prompts_the_text_encoder_cannot_take_whole_are_reported_once(run_args, tmp_path, capsys):
    prompts = tmp_path / "prompts_lossy.txt"
    prompts.write_text("a cat\n" + "a very " * 10 + "long dog\n" + "a 猫\n")
    train.main(with_prompts(run_args(tmp_path / "run", 2), prompts))
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("train.py: warning:")]
    assert len(warnings) == 2, captured.err
    assert "1 of 3 prompts are longer than the text encoder's 14 tokens" in warnings[0]
    assert (
        "1 of 3 prompts have characters the tokenizer does not know" in warnings[1]
        and "猫" in warnings[1]
    )
    assert "will take about" not in captured.out  # a short epoch gives no estimate


def test_a_long_epoch_says_after_its_first_batch_how_long_its_sampling_will_take(
    run_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(epoch_log, "LONG_EPOCH", 0)  # every epoch counts as long
    train.main(run_args(tmp_path / "run", 2))
    assert (
        capsys.readouterr().out.count("epoch 1: sampling its 8 trajectories will take about") == 1
    )


def test_weights_that_become_non_finite_stop_the_run_before_they_are_saved_and_say_what_would_work(
    run_args, tmp_path, monkeypatch, capsys
):
    def poisoned_step(cfg, run):  # as a far too large learning rate would leave them
        for p in run.params:
            p.data.fill_(float("nan"))
        run.optimizer.zero_grad()
        return True

    monkeypatch.setattr(train, "optimizer_step", poisoned_step)
    with pytest.raises(SystemExit) as exit:
        train.main(run_args(tmp_path / "run", 2))
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and "non-finite" in error and "a lower --lr than 0.01" in error, (
        error
    )
    assert (
        not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "lora").exists()
    )

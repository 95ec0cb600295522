"""Your own reward: a function in a file (--reward FILE.py:NAME), in a module (module:NAME) or given
to train.main(reward_fn=...) trains and resumes; config.json names it (and hashes its file), so a
resume uses the same one; a wrong return ends the run on the first batch, in one line naming it."""

import json

import numpy as np
import pytest
import torch

from pathlib import Path

import train

ROOT_EXAMPLE = "examples/brightness.py:brightness"


@pytest.fixture
def args(tiny_run):
    return tiny_run


def metric(out, key):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_a_reward_in_a_file_trains_resumes_and_is_recorded_with_its_files_hash(
    args, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "def redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2)).tolist()  # a list will do\n"
    )
    train.main(args(tmp_path / "run", 1, "--reward", "mine.py:redness"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        saved["reward"] == f"{tmp_path / 'mine.py'}:redness" and len(saved["reward_sha256"]) == 64
    )  # the file made absolute
    monkeypatch.chdir(tmp_path.parent)  # resumed from elsewhere: the absolute path still finds it
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert len(metric(tmp_path / "run", "reward_mean")) == 2


def test_a_reward_in_a_module_trains_and_resumes(args, tmp_path, monkeypatch):
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "__init__.py").write_text("")
    (tmp_path / "my_rewards" / "light.py").write_text(
        "import numpy as np\n\ndef score(images, prompts):\n"
        "    return np.asarray(images.mean(dim=(1, 2, 3)))  # an array will do\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    train.main(args(tmp_path / "run", 1, "--reward", "my_rewards.light:score"))
    assert (
        json.loads((tmp_path / "run" / "config.json").read_text())["reward"]
        == "my_rewards.light:score"
    )
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert len(metric(tmp_path / "run", "reward_mean")) == 2


def test_a_function_given_to_main_trains_and_resumes_only_when_given_again(args, tmp_path, capsys):
    history = train.main(args(tmp_path / "run", 1), reward_fn=brightness)
    assert (
        json.loads((tmp_path / "run" / "config.json").read_text())["reward"]
        == f"python:{__name__}.brightness"
    )
    assert 0 < history[0]["reward_mean"] < 1  # a brightness, not a JPEG size
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    error = capsys.readouterr().err.strip()
    assert (
        exit.value.code == 2 and len(error.splitlines()) == 1 and "reward_fn=brightness" in error
    ), error
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"], reward_fn=brightness)
    assert len(metric(tmp_path / "run", "reward_mean")) == 2


def test_a_changed_or_missing_reward_file_is_refused_on_resume_unless_accepted(
    args, tmp_path, capsys
):
    reward = tmp_path / "mine.py"
    reward.write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    train.main(args(tmp_path / "run", 1, "--reward", f"{reward}:score"))
    reward.write_text("def score(images, prompts):\n    return -images.mean(dim=(1, 2, 3))\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    error = capsys.readouterr().err.strip()
    assert (
        exit.value.code == 2
        and "has changed since the run began" in error
        and "--accept-changed-reward" in error
    ), error
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--accept-changed-reward"])
    assert (
        metric(tmp_path / "run", "reward_mean")[1] < 0
    )  # trained on with the changed reward, which config.json now records
    train.main(["--resume", str(tmp_path / "run"), "--epochs", "3"])  # no second acceptance needed
    reward.unlink()
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(tmp_path / "run"), "--epochs", "4"])
    assert exit.value.code == 2 and "is gone" in capsys.readouterr().err


WRONG = {
    "too few": (lambda images, prompts: images.mean(dim=(1, 2, 3))[:-1], "shape (1,) for 2 images"),
    "a map of the wrong size": (
        lambda images, prompts: images.mean(dim=1)[:, :2],
        "shape (2, 2, 16)",
    ),
    "with grad": (
        lambda images, prompts: images.mean(dim=(1, 2, 3)).requires_grad_(),
        "requires grad",
    ),
    "not numbers": (lambda images, prompts: ["bright"] * len(prompts), "not numbers"),
    "nothing": (lambda images, prompts: None, "returned None"),
    "non-finite": (
        lambda images, prompts: torch.full((len(prompts),), float("nan")),
        "returned non-finite values",
    ),
}


@pytest.mark.parametrize("case", WRONG)
def test_a_wrong_return_ends_the_run_on_the_first_batch_in_one_line_naming_the_function(
    case, args, tmp_path, capsys
):
    fn, problem = WRONG[case]
    calls = []

    def wrong(images, prompts):
        calls.append(len(prompts))
        return fn(images, prompts)

    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1), reward_fn=wrong)
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and len(error.splitlines()) == 1, error
    assert (
        f"python:{__name__}" in error
        and "wrong" in error
        and problem in error
        and "on the first batch" in error
        and f"train.main(['--resume', '{tmp_path / 'run'}'], reward_fn=wrong)" in error
    ), error
    assert calls == [2]  # the first batch's: the epoch's other batch was never sampled for it
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_example_reward_trains_from_the_command_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(train.__file__).parent)
    history = train.main(args(tmp_path / "run", 1, "--reward", ROOT_EXAMPLE))
    assert np.isfinite(history[0]["reward_mean"]) and 0 < history[0]["reward_mean"] < 1


def trl_style(images, prompts, prompt_metadata):
    """TRL's DDPOTrainer calls reward_fn(images, prompts, prompt_metadata) -> (rewards, info)."""
    assert prompt_metadata == [{} for _ in prompts]
    return images.mean(dim=(1, 2, 3)), {}


def port_style(images, prompts, metadata):
    """The official port's reward returns (numpy rewards, info dict)."""
    return images[:, 1].mean(dim=(1, 2)).cpu().numpy(), {"note": "ignored"}


@pytest.mark.parametrize("fn", [trl_style, port_style])
def test_rewards_of_trls_and_the_official_ports_signature_train_as_they_are(fn, args, tmp_path):
    history = train.main(args(tmp_path / "run", 1), reward_fn=fn)
    assert 0 < history[0]["reward_mean"] < 1


def test_an_exception_in_your_reward_shows_its_frames_then_one_line_on_how_to_continue(
    args, tmp_path, capsys
):
    def broken(images, prompts):
        return {"a": 1}["missing key"]

    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1), reward_fn=broken)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1
    assert error[0] == "Traceback (most recent call last):"
    assert any('return {"a": 1}["missing key"]' in line for line in error)  # the user's own frame
    last = error[-1]
    assert last.startswith("train.py: stopped: --reward python:") and "raised KeyError" in last
    assert "no epoch had finished" in last
    assert f"train.main(['--resume', '{tmp_path / 'run'}'], reward_fn=broken)" in last
    assert not (tmp_path / "run" / "checkpoints").exists()

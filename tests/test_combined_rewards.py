"""Rewards combined with weights (--rewards SPEC=WEIGHT ..., issue 40): the run trains on the
weighted sum, its metrics carry each term's raw mean, a lone term of weight 1 trains exactly as
--reward, a term that fails names itself, each file term keeps its resume check, and the default
run folder's name stays short."""

import json
from pathlib import Path

import pytest

import train
from machinery import cli

BRIGHTNESS = "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n"
TIMING = ("sample_seconds", "train_seconds", "eval_seconds")


@pytest.fixture
def args(tiny_run):
    return tiny_run


def rows(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_the_run_trains_on_the_weighted_sum_and_logs_each_terms_raw_mean(args, tmp_path):
    (tmp_path / "mine.py").write_text(BRIGHTNESS)
    terms = ["jpeg=1", f"{tmp_path / 'mine.py'}:brightness=-2.5"]
    train.main(args(tmp_path / "run", 2, "--rewards", *terms))
    for row in rows(tmp_path / "run"):
        jpeg, brightness = row["reward_mean_jpeg"], row["reward_mean_brightness"]
        assert jpeg < 0 < brightness < 1
        assert row["reward_mean"] == pytest.approx(jpeg - 2.5 * brightness, rel=1e-5)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["reward"] == "sum: 1 jpeg + -2.5 brightness"
    assert list(saved["rewards_sha256"]) == [f"{tmp_path / 'mine.py'}:brightness"]


def test_a_lone_term_of_weight_one_trains_exactly_as_reward_does(args, tmp_path):
    train.main(args(tmp_path / "sum", 2, "--rewards", "jpeg=1"))
    train.main(args(tmp_path / "plain", 2, "--reward", "jpeg"))
    summed = rows(tmp_path / "sum")
    assert [row.pop("reward_mean_jpeg") for row in summed] == [row["reward_mean"] for row in summed]
    assert summed == rows(tmp_path / "plain")


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--rewards", "jpeg"], "--rewards jpeg: give SPEC=WEIGHT"),
        (["--rewards", "jpeg=heavy"], "--rewards jpeg=heavy: give SPEC=WEIGHT"),
        (["--rewards", "jpeg=nan"], "--rewards jpeg=nan: give SPEC=WEIGHT"),
        (["--rewards", "nowhere.py:fn=1"], "--rewards nowhere.py:fn=1: no file nowhere.py"),
        (["--reward", "jpeg", "--rewards", "jpeg=1"], "--reward and --rewards: give one"),
    ],
)
def test_a_bad_term_is_refused_in_one_line_naming_it(flags, problem, args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, *flags))
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(error.splitlines()) == 1 and problem in error, error
    assert not (tmp_path / "run").exists()


def test_a_term_that_fails_names_itself(args, tmp_path, capsys):
    (tmp_path / "short.py").write_text("def one(images, prompts):\n    return [1.0]\n")
    term = f"{tmp_path / 'short.py'}:one"
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, "--rewards", "jpeg=1", f"{term}=1"))
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and len(error.splitlines()) == 1
    assert f"--rewards {term}=1: returned shape (1,) for 2 images" in error


def test_a_changed_term_file_is_refused_on_resume(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(BRIGHTNESS)
    train.main(args(tmp_path / "run", 1, "--rewards", "jpeg=1", "mine.py:brightness=1"))
    (tmp_path / "mine.py").write_text(BRIGHTNESS.replace("images.mean", "-images.mean"))
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert exit.value.code == 2 and "has changed since the run began" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, folder",
    [
        (["--rewards", "jpeg=1", "examples/brightness.py:brightness=0.5"], "jpeg+brightness"),
        (["--reward", "http://127.0.0.1:8000/aesthetic"], "served-aesthetic"),
        (["--rewards", "http://10.0.0.2:9000/=1", "jpeg=0.1"], "served-10.0.0.2+jpeg"),
    ],
)
def test_the_default_run_folder_name_stays_short_for_a_url_or_a_sum(flags, folder, monkeypatch):
    monkeypatch.chdir(Path(train.__file__).parent)  # examples/ is there
    cfg = cli.parse_args(flags)
    assert cfg.out.startswith(f"runs/{folder}-ddpo-is-"), cfg.out

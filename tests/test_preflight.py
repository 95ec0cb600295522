"""python train.py --preflight (issue 40): on one batch, one line a check (ok, warn or fail), exit 0
when nothing failed; it passes on the bundled model's settings, warns on a flat reward, fails on a
reward that returns what is not scores, and writes nothing."""

import pytest

import train

SMALL = [
    "--samples-per-epoch",
    "8",
    "--batch-size",
    "4",
    "--updates-per-epoch",
    "2",
    "--num-steps",
    "3",
]


def preflight(capsys, *flags):
    with pytest.raises(SystemExit) as exit:
        train.main(["--preflight", *SMALL, *flags])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("preflight:")]
    return exit.value.code, {line.split()[2].rstrip(":"): line.split()[1] for line in lines}, lines


def test_the_preflight_passes_on_the_bundled_model_and_writes_nothing(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, status, lines = preflight(capsys)
    assert code == 0, lines
    assert status == dict.fromkeys(("sampling", "log-prob", "reward", "gradient", "time"), "ok")
    assert "the LoRA's B matrices" in next(line for line in lines if "gradient:" in line)
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing else


def test_a_flat_reward_warns_and_a_reward_that_returns_no_scores_fails(
    capsys, tmp_path, tiny_pipeline_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "def flat(images, prompts):\n    return [0.5] * len(prompts)\n\n"
        "def short(images, prompts):\n    return [0.5]\n"
    )
    model = ["--model", str(tiny_pipeline_dir), "--prompts", "simple_animals"]
    code, status, lines = preflight(capsys, *model, "--reward", f"{tmp_path / 'mine.py'}:flat")
    assert code == 0 and status["reward"] == "warn" and status["gradient"] == "ok", lines
    assert "nothing trains" in next(line for line in lines if "reward:" in line)
    code, status, lines = preflight(capsys, *model, "--reward", f"{tmp_path / 'mine.py'}:short")
    assert code == 1 and status["reward"] == "fail", lines
    assert "shape (1,) for 4 images" in next(line for line in lines if "reward:" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py"]  # nothing written

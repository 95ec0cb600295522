"""train.py answers --help, --show-config and a bad flag before it imports torch or diffusers
(seconds of loading); config.py stands in for them with their names and torch's CUDA check."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataclasses

from machinery import cli, config, devices, prompts, reward_specs
from machinery import parallel
import toy_world

ROOT = Path(__file__).resolve().parents[1]
# run train.py as `python train.py ...` does; on its way out, say which heavy libraries were imported
PROBE = """import runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("imported:", sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "flags, status",
    [
        (["--help"], 0),
        (["--show-config", "--algo", "rwr"], 0),
        (["--lr", "-1"], 2),
        (["--algo", "ppo"], 2),
        (["--min-count", "40"], 2),
        (["--prompts", "no_such_file.txt"], 2),
        (["--device", "gpu0"], 2),
    ],
)
def test_help_show_config_and_flag_errors_answer_before_torch_and_diffusers_load(
    flags, status, tmp_path
):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *flags, "--out", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == status, result.stderr
    assert "imported: []" in result.stdout, result.stdout[-300:]
    assert not (tmp_path / "run").exists()


def test_every_built_in_reward_is_declared_once_with_a_function_and_settings_that_exist():
    settings = {f.name for f in dataclasses.fields(config.Config)}
    reward_help = next(f for f in dataclasses.fields(config.Config) if f.name == "reward")
    for name, reward in reward_specs.REWARDS.items():
        assert callable(reward_specs.function(reward)), name
        assert {*reward.options, *reward.models} <= settings, name
        assert name in reward_help.metadata["help"], name


def test_cuda_available_agrees_with_torch():
    assert devices.cuda_available() == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine where torch cannot use CUDA")
def test_a_cuda_device_torch_cannot_use_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        parallel.setup("cuda")
    assert exit.value.code == 2 and "--device cuda" in capsys.readouterr().err


def test_a_prompt_file_an_editor_saved_with_a_byte_order_mark_reads_as_its_prompts(tmp_path):
    """The mark is not part of the first prompt: the toy world's judge still knows it, the encoder sees no stray character."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(("\ufeff" + "\r\n".join(toy_world.PROMPTS[:3]) + "\r\n").encode("utf-8"))
    assert prompts.load_prompts(str(path)) == toy_world.PROMPTS[:3]


def test_help_lists_the_papers_settings_then_the_extensions_then_the_runs_machinery(capsys):
    flags = {f.name for f in dataclasses.fields(config.Config) if f.metadata.get("flag", True)}
    fields = [f for f in dataclasses.fields(config.Config) if f.name in flags]
    group_of = {f.name: f.metadata["group"] for f in fields}
    assert set(group_of.values()) == set(config.GROUPS)  # every flag in one of the groups
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"{title}:") for title in config.GROUPS]
    assert positions == sorted(positions)
    sections = text[positions[0] :].split(
        "\n\n"
    )  # the groups, in order: each flag's line in its own
    for section, title in zip(sections, config.GROUPS):
        names = [name for name, group in group_of.items() if group == title]
        assert all(f"  --{name.replace('_', '-')}" in section for name in names), section[:80]


def test_the_maths_module_loads_no_model_library():
    """ddpo.py is torch and numpy: reading the losses loads no transformers, diffusers or hub client."""
    probe = "import sys, ddpo; print(sorted(m for m in ('transformers', 'diffusers', 'huggingface_hub') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr

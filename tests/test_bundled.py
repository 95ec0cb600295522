"""The bundled models: tiny-shapes and tiny-words load offline from the repository and sample a
batch; tiny-shapes is what --model auto picks on a machine without CUDA."""

import os

import pytest
import torch

import toy_world
from machinery import cli, config
from machinery.pipeline import load_pipeline
from sampler import sample_trajectories
from toy_world import words


@pytest.mark.parametrize(
    "model, prompts, channels",
    [
        (config.BUNDLED_MODEL, toy_world.PROMPTS, 4),
        (config.BUNDLED_WORDS_MODEL, words.PROMPTS, 16),  # the model that writes
    ],
    ids=["tiny-shapes", "tiny-words"],
)
def test_bundled_model_loads_offline_and_samples_a_batch(monkeypatch, model, prompts, channels):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(model)
    size_mb = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 1e6
    assert size_mb <= 15
    traj = sample_trajectories(
        pipe,
        prompts[:4],
        num_steps=5,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj["images"].shape == (4, 3, 64, 64)
    assert traj["latents"].shape == (4, 6, channels, 8, 8)
    assert torch.isfinite(traj["log_probs"]).all()


def test_model_auto_without_cuda_picks_the_bundled_model_and_the_tiny_preset(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(cli, "cuda_available", lambda: False)
    cfg = cli.parse_args(["--out", str(tmp_path / "run"), "--epochs", "3"])
    assert os.path.samefile(cfg.model, config.BUNDLED_MODEL) and cfg.preset == "tiny"
    assert cfg.prompts == "shapes" and cfg.epochs == 3  # the preset, and a flag that overrides it
    assert cfg.samples_per_epoch == config.PRESETS["tiny"]["samples_per_epoch"]
    assert "bundled" in capsys.readouterr().out


def test_other_models_keep_the_papers_settings(tmp_path):
    cfg = cli.parse_args(["--model", "some/hub-id", "--out", str(tmp_path / "run")])
    assert (
        cfg.preset == "paper"
        and cfg.samples_per_epoch == 256
        and cfg.num_steps == 50
        and cfg.lr == 3e-4
    )


def test_model_auto_with_cuda_picks_sd14_and_the_papers_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    cfg = cli.parse_args(["--out", str(tmp_path / "run"), "--mixed-precision", "fp16"])
    assert (
        cfg.model == config.SD14
        and cfg.preset == "paper"
        and cfg.device == "cuda"
        and cfg.num_steps == 50
    )

"""train.py end to end on the tiny pipeline: the run folder, the saved LoRA, and refused input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import machinery.run
from machinery import config
import train
from machinery.cli import parse_args
from machinery.config import Config
from machinery.pipeline import add_trainable, load_pipeline
from machinery.leash import base_policy
from sampler import sample_trajectories

TINY_RUN = [
    "--epochs",
    "1",
    "--samples-per-epoch",
    "8",
    "--batch-size",
    "2",
    "--num-steps",
    "4",
    "--prompts",
    "simple_animals",
]


def test_one_epoch_writes_the_run_folder_and_a_loadable_lora(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    history = train.main(
        ["--model", str(tiny_pipeline_dir), "--out", str(out), "--lr", "1e-2", *TINY_RUN]
    )
    assert len(history) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["updates_per_epoch"] == 4 and config["algo"] == "ddpo-is"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    for key in (
        "epoch",
        "reward_mean",
        "reward_std",
        "reward_queries",
        "loss",
        "approx_kl",
        "clipfrac",
        "sample_seconds",
        "train_seconds",
    ):
        assert key in metrics[0]
    assert metrics[0]["reward_queries"] == 8 and metrics[0]["reward_mean"] < 0
    assert (out / "samples" / "epoch_0000.png").is_file() and (out / "reward_curve.png").is_file()

    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    tuned = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    tuned.load_lora_weights(out / "lora")
    latents, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        change = (
            (tuned.unet(latents, t, text).sample - base.unet(latents, t, text).sample).abs().max()
        )
    assert change > 0  # the trained LoRA is loaded and moves the UNet


def test_full_unet_fine_tune_saves_the_unet_and_copies_it_for_no_logged_number(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    copies, copy = [], machinery.run.base_policy
    monkeypatch.setattr(
        machinery.run, "base_policy", lambda unet, rank: copies.append(rank) or copy(unet, rank)
    )
    out = tmp_path / "run"
    history = train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--out",
            str(out),
            "--lora-rank",
            "0",
            "--algo",
            "ddpo-sf",
            *TINY_RUN,
        ]
    )
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-5
    assert (out / "unet" / "config.json").is_file() and not (out / "lora").exists()
    assert (
        copies == [] and "kl_to_base" not in history[0]
    )  # no frozen copy of the UNet: neither the leash nor the evaluation asked


def test_the_base_policy_is_held_only_where_something_reads_it():
    def needed(*flags):
        return config.base_needed(parse_args([*flags, "--out", "/nonexistent/base"]))

    assert needed() and needed(
        "--algo", "pxpo"
    )  # a LoRA: the adapter switched off, free; kl_to_base is logged
    assert not needed("--lora-rank", "0") and not needed(
        "--algo", "rwr"
    )  # a full copy of the UNet for a logged number; rwr logs none
    assert (
        needed("--lora-rank", "0", "--kl-coef", "0.1")
        and needed("--lora-rank", "0", "--eval-every", "5")
        and needed("--algo", "rwr", "--eval-every", "5")
    )


@pytest.mark.parametrize(
    "algo, reward",
    [
        ("ddpo-sf", "jpeg"),
        ("rwr", "jpeg"),
        ("rwr-sparse", "jpeg"),
        ("pxpo", "jpeg"),
        ("pxpo", "pixel_color"),
        ("ddpo-is", "pixel_color"),
    ],
)
def test_every_algorithm_trains_one_epoch_and_moves_the_lora(
    algo, reward, tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "run"
    history = train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--out",
            str(out),
            "--algo",
            algo,
            "--reward",
            reward,
            "--lr",
            "1e-2",
            *TINY_RUN,
        ]
    )
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert ("approx_kl" in history[0]) == algo.startswith(("ddpo", "pxpo"))
    if reward == "pixel_color":
        assert 0 < history[0]["reward_mean"] < 1  # the map's mean
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(
        name.endswith("lora.up.weight") and value.abs().max() > 0 for name, value in lora.items()
    )  # up starts at 0


def test_bf16_trains_the_lora_and_keeps_it_and_its_optimiser_in_fp32(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    history = train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--out",
            str(out),
            "--mixed-precision",
            "bf16",
            "--lr",
            "1e-2",
            *TINY_RUN,
        ]
    )
    assert np.isfinite(history[0]["loss"])
    state = torch.load(out / "checkpoints" / "epoch_0000.pt", weights_only=False)
    assert state["trainable"] and all(p.dtype == torch.float32 for p in state["trainable"].values())
    assert any(
        name.endswith("lora_B.default.weight") and p.abs().max() > 0
        for name, p in state["trainable"].items()
    )  # B starts at 0
    moments = [
        v
        for s in state["optimizer"]["state"].values()
        for k, v in s.items()
        if k.startswith("exp_avg")
    ]
    assert moments and all(v.dtype == torch.float32 for v in moments)


def test_rwr_takes_its_updates_in_every_pass_over_the_round_and_logs_its_selectivity(
    tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "run"
    history = train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--out",
            str(out),
            "--algo",
            "rwr",
            "--beta",
            "3",
            *TINY_RUN,
        ]
    )
    state = torch.load(out / "checkpoints" / "epoch_0000.pt", weights_only=False)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {5 * 4}  # 5 passes (inner epochs) x 4 updates each
    assert 1 / 8 <= history[0]["weight_share"] <= 1


@pytest.mark.parametrize(
    "algo, kl_coef", [("ddpo-is", "0.5"), ("pxpo", "0.5"), ("ddpo-is", "0")]
)  # 0: kl_to_base only measured
def test_taking_several_trained_steps_through_one_forward_gives_the_same_update(
    algo, kl_coef, tiny_pipeline_dir
):
    pipe = load_pipeline(tiny_pipeline_dir)
    params = add_trainable(pipe, lora_rank=4)
    base = base_policy(pipe.unet, 4)
    torch.manual_seed(0)
    for p in params:  # LoRA B starts at 0, and with it every gradient of A: move both
        p.data.normal_(0, 0.05)
    start = [p.detach().clone() for p in params]
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog"] * 2,
        num_steps=4,
        guidance_scale=5.0,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
    )
    advantages = torch.randn(4, *([] if algo == "ddpo-is" else traj["latents"].shape[-2:]))
    moved, stats = [], []
    for k in (1, 3):  # the 4 trained steps one forward each, or 3 together and then 1
        cfg = parse_args(
            [
                "--model",
                str(tiny_pipeline_dir),
                "--algo",
                algo,
                "--num-steps",
                "4",
                "--samples-per-epoch",
                "4",
                "--batch-size",
                "2",
                "--updates-per-epoch",
                "1",
                "--steps-per-forward",
                str(k),
                "--kl-coef",
                kl_coef,
                "--max-grad-norm",
                "1e9",
            ]
        )
        for p, p0 in zip(params, start):
            p.data.copy_(p0)
        optimizer = torch.optim.SGD(params, lr=1.0)  # the step is the gradient itself
        stats.append(
            train.update(
                cfg,
                train.Learner(pipe, params, optimizer, np.random.default_rng(0), base=base),
                traj,
                advantages,
            )
        )
        moved.append(torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, start)]))
    # float rounding only: the sums run in another order (measured: up to 1.1e-6 of the largest change, by the thread count)
    assert moved[0].abs().max() > 0 and torch.allclose(
        moved[1], moved[0], rtol=1e-4, atol=1e-5 * moved[0].abs().max().item()
    )
    assert stats[0].keys() == stats[1].keys() >= {"loss", "approx_kl", "clipfrac", "kl_to_base"}
    for key in stats[0]:
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4, abs=1e-9), key


def test_show_config_prints_every_setting_and_where_it_came_from_and_writes_nothing(
    capsys, tmp_path
):
    with pytest.raises(SystemExit) as exit:
        parse_args(
            ["--show-config", "--algo", "rwr", "--lr", "1e-3", "--out", str(tmp_path / "run")]
        )
    assert exit.value.code == 0
    lines = {
        line.split()[0]: line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("--", "  "))
    }
    names = {
        f.name.replace("_", "-"): f.metadata.get("flag", True) for f in dataclasses.fields(Config)
    }
    assert {"run-id", "reward-sha256", "rewards-sha256"} <= {
        n for n, flag in names.items() if not flag
    }
    assert set(lines) == {
        ("--" if flag else "") + name for name, flag in names.items()
    }  # every setting, once; those that are no flags without dashes
    assert lines["run-id"].split()[2:] == ["derived:", "new", "for", "each", "run"]
    expected = {  # the bundled model (no CUDA here): preset tiny; each layer over the one before, the flag over all
        "--num-steps": ("20", "preset tiny"),
        "--updates-per-epoch": ("4", "algorithm rwr"),
        "--inner-epochs": ("5", "algorithm rwr"),
        "--beta": ("6.0", "tuned for jpeg and rwr"),
        "--lr": ("0.001", "flag"),
        "--eta": ("1.0", "default: original code"),
        "--clip-range": ("0.0008", "preset tiny"),
        "--max-grad-norm": ("1.0", "default: paper, appendix D.5"),
    }
    for flag, (value, source) in expected.items():
        assert lines[flag].split()[1] == value and source in lines[flag], lines[flag]
    assert not (tmp_path / "run").exists()


def test_sampling_has_its_own_batch_size_which_defaults_to_the_training_one(
    tiny_run, tmp_path, monkeypatch
):
    # the bundled model's preset samples its 64 trajectories in one batch, trains 5 steps a forward
    demo = parse_args(["--reward", "jpeg", "--out", "/nonexistent/run"])
    assert (demo.batch_size, demo.sample_batch_size, demo.steps_per_forward) == (16, 64, 5)
    out = tmp_path / "run"
    assert parse_args(tiny_run(out, 1)).sample_batch_size == 2  # elsewhere: --batch-size
    sampled_in, sample = [], train.sample_trajectories

    def sampling(pipe, prompts, num_steps, w, eta, batch_size, *args, **kwargs):
        sampled_in.append((batch_size, kwargs["decode_batch_size"]))
        return sample(pipe, prompts, num_steps, w, eta, batch_size, *args, **kwargs)

    monkeypatch.setattr(train, "sample_trajectories", sampling)
    train.main(tiny_run(out, 1, "--sample-batch-size", "4"))
    assert sampled_in == [(4, 2)]  # sampled 4 at a time, decoded --batch-size at a time
    # a run of an earlier version (no sample_batch_size saved) resumes sampling at its batch size
    saved = json.loads((out / "config.json").read_text())
    del saved["sample_batch_size"]
    (out / "config.json").write_text(json.dumps(saved))
    assert parse_args(["--resume", str(out), "--epochs", "2"]).sample_batch_size == 2

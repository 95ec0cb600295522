"""sample.py: a run's weights, loaded by diffusers' own load_lora_weights (or the saved UNet), beside
the base model's, from the same noise, with the run's sampler settings."""

import json

import pytest
import torch

import sample
import train
from machinery.pipeline import load_pipeline

TINY = [
    "--samples-per-epoch",
    "8",
    "--batch-size",
    "2",
    "--num-steps",
    "3",
    "--lr",
    "3e-2",
    "--min-count",
    "4",
    "--buffer-size",
    "6",
    "--epochs",
    "1",
]


@pytest.mark.parametrize(
    "lora_rank, reward",
    [(4, "jpeg"), (0, "jpeg"), (4, "pixel_color")],
    ids=["lora", "whole-unet", "pixel-reward"],
)
def test_sample_writes_both_sides_from_the_same_noise_with_the_runs_settings(
    lora_rank, reward, tiny_pipeline_dir, tmp_path
):
    run, out, prompts = tmp_path / "run", tmp_path / "images", tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            *TINY,
            "--prompts",
            str(prompts),
            "--lora-rank",
            str(lora_rank),
            "--reward",
            reward,
            "--guidance-scale",
            "4",
            "--out",
            str(run),
        ]
    )
    base, tuned = sample.main([str(run), "--num-images", "3", "--seed", "1", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "base_0.png",
        "base_1.png",
        "base_2.png",
        "grid.png",
        "tuned_0.png",
        "tuned_1.png",
        "tuned_2.png",
    ]
    stock = load_pipeline(
        tiny_pipeline_dir
    )  # the base side is a plain pipeline's sample with the run's steps, guidance and eta, seed 1
    expected = stock(
        ["a cat", "a dog", "a cat"],
        num_inference_steps=3,
        guidance_scale=4.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images
    assert torch.equal(base, expected)
    assert (tuned - base).abs().max() > 1e-3  # the trained weights were loaded
    again, tuned_again = sample.main(
        [str(run), "--num-images", "3", "--seed", "1", "--out", str(tmp_path / "again")]
    )
    assert torch.equal(again, base) and torch.equal(tuned_again, tuned)


def test_sample_refuses_a_folder_without_a_trained_run_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    for folder, named in ((tmp_path / "none", "config.json"), (tmp_path, "no lora/ or unet/")):
        with pytest.raises(SystemExit) as exit:
            sample.main([str(folder)])
        error = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and len(error.splitlines()) == 1 and named in error, error


def test_sample_refuses_damaged_weights_a_bad_device_and_an_out_that_is_a_file_in_one_line(
    tiny_pipeline_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    train.main(
        ["--model", str(tiny_pipeline_dir), *TINY, "--prompts", "simple_animals", "--out", str(run)]
    )
    lora = run / "lora" / "pytorch_lora_weights.safetensors"
    whole = lora.read_bytes()

    def refused(args, named):
        with pytest.raises(SystemExit) as exit:
            sample.main([str(run), *args])
        error = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and len(error.splitlines()) == 1, error
        assert error.startswith("sample.py: error:") and named in error, error
        assert not (run / "generated").exists()  # nothing written

    refused(["--device", "banana"], "--device banana")
    refused(["--device", "cuda:99"], "--device cuda:99")  # no CUDA here, or not 100 devices
    settings = (run / "config.json").read_text()
    moved = json.loads(settings) | {"model": str(tmp_path / "moved-model")}
    (run / "config.json").write_text(json.dumps(moved))
    refused([], "cannot be loaded")
    (run / "config.json").write_text(settings)
    (run / "prompts.txt").write_bytes(b"\xff\xfe\x00 not text")
    refused([], "the run's prompts")
    (run / "prompts.txt").write_text("a cat\n")
    (tmp_path / "a-file").write_text("")
    refused(["--out", str(tmp_path / "a-file")], "--out")
    refused(["--out", str(tmp_path / "a-file" / "images")], "is a file")
    lora.write_bytes(whole[:100])  # a copy cut short, as a full disk or a killed copy leaves it
    refused([], str(lora))
    lora.write_bytes(whole[: len(whole) // 2])
    refused([], "--resume")
    (run / "lora").rename(run / "unet")  # a full fine-tune's folder without its config.json
    (run / "unet" / "pytorch_lora_weights.safetensors").write_bytes(whole)
    refused([], "config.json")

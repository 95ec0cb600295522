"""The bundled models' pretraining runs on a CPU and yields pipelines train.py can load."""

import torch

from toy_world import pretrain, sd3
import toy_world
from machinery.families import sd3 as flow
from machinery.pipeline import load_pipeline
from sampler import sample_trajectories


def test_tokenizer_spells_world_words_as_one_token_and_falls_back_to_characters():
    tokenizer = pretrain.make_tokenizer(["a", "red", "circle"])
    assert tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    assert tokenizer.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]


def test_pretraining_runs_a_few_steps_and_saves_a_loadable_pipeline(tmp_path):
    steps = [
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--dataset-size",
        "250",
        "--unet-steps",
        "3",
        "--unet-batch",
        "4",
        "--save-every",
        "2",
    ]
    before = pretrain.build_pipeline(
        words=["a", *toy_world.COLOURS, *toy_world.SHAPES]
    ).unet.state_dict()
    pretrain.main(["--out", str(tmp_path), *steps])
    pipe = load_pipeline(tmp_path)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the encoded data
    moved = [not torch.equal(before[name], value) for name, value in pipe.unet.state_dict().items()]
    assert any(moved)  # the saved UNet is the trained (EMA) one, not the initial weights
    traj = sample_trajectories(
        pipe,
        toy_world.PROMPTS[:2],
        num_steps=3,
        generator=torch.Generator().manual_seed(0),
        policy=pipe.family.POLICY,
    )
    assert traj["images"].shape == (2, 3, 64, 64)


def test_the_t5_tokenizer_reads_world_words_as_one_token_and_falls_back_to_characters():
    tokenizer = sd3.make_t5_tokenizer(["a", "red", "circle"])
    assert tokenizer.tokenize("a red circle") == ["\u2581a", "\u2581red", "\u2581circle"]
    assert tokenizer.tokenize("a dog") == ["\u2581a", "\u2581d", "o", "g"]


def test_flow_pretraining_runs_a_few_steps_and_saves_a_loadable_sd3_pipeline(tmp_path):
    """The bundled flow model's recipe (toy_world/sd3.py), on a VAE of the bundled model's shape."""
    vae = tmp_path / "vae"
    pretrain.build_pipeline(image_size=64).vae.save_pretrained(vae)
    steps = ["--dataset-size", "250", "--steps", "3", "--batch", "4", "--save-every", "2"]
    sd3.main(["--out", str(tmp_path / "flow"), "--vae", str(vae), "--layers", "1", *steps])
    pipe = load_pipeline(tmp_path / "flow")
    assert flow.is_flow(pipe.scheduler) and pipe.vae.config.shift_factor != 0
    traj = sample_trajectories(
        pipe,
        toy_world.PROMPTS[:2],
        num_steps=3,
        generator=torch.Generator().manual_seed(0),
        policy=pipe.family.POLICY,
    )
    assert traj["images"].shape == (2, 3, 64, 64) and torch.isfinite(traj["log_probs"]).all()

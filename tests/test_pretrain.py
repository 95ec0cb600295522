"""The bundled model's pretraining runs on a CPU and yields a pipeline train.py can load."""

import torch

from toy_world import pretrain
import toy_world
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
        pipe, toy_world.PROMPTS[:2], num_steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert traj["images"].shape == (2, 3, 64, 64)

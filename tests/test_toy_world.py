"""The toy world behind the bundled model, and its judge of prompt fidelity."""

import numpy as np
import pytest
import torch

import toy_world
from machinery.reward_specs import REWARDS, function
from rewards import jpeg_kilobytes


def other(prompt, colour=None, shape=None):
    c, s = toy_world.parse(prompt)
    return f"a {colour or c} {shape or s}"


@pytest.fixture(scope="module")
def world():
    images, prompts = toy_world.sample_batch(300, np.random.default_rng(0))
    return torch.from_numpy(images), prompts


def test_judge_scores_world_images_one_for_their_own_prompt(world):
    images, prompts = world
    assert set(prompts) == set(toy_world.PROMPTS)
    assert toy_world.judge(images, prompts).min().item() == 1.0
    assert function(REWARDS["toy_alignment"]) is toy_world.judge


def test_judge_scores_zero_for_the_wrong_colour(world):
    images, prompts = world
    colours = list(toy_world.COLOURS)
    wrong = [
        other(p, colour=colours[(colours.index(toy_world.parse(p)[0]) + 1) % len(colours)])
        for p in prompts
    ]
    assert toy_world.judge(images, wrong).max().item() == 0.0


def test_judge_scores_half_for_the_right_colour_in_the_wrong_shape(world):
    images, prompts = world
    shapes = toy_world.SHAPES
    wrong = [other(p, shape=shapes[(shapes.index(toy_world.parse(p)[1]) + 1) % 3]) for p in prompts]
    assert set(toy_world.judge(images, wrong).tolist()) == {0.5}


def test_judge_scores_zero_for_noise_and_for_empty_backgrounds():
    rng = np.random.default_rng(1)
    noise = torch.rand(30, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    empty = torch.from_numpy(
        np.stack([toy_world.background(rng) for _ in range(30)]).transpose(0, 3, 1, 2)
    ).float()
    prompts = [toy_world.PROMPTS[i % 15] for i in range(30)]
    assert toy_world.judge(noise, prompts).max().item() == 0.0
    assert toy_world.judge(empty, prompts).max().item() == 0.0


def test_judge_refuses_prompts_outside_the_world():
    with pytest.raises(ValueError, match="toy world"):
        toy_world.judge(torch.zeros(1, 3, 64, 64), ["a photo of a dog"])


def test_plain_backgrounds_leave_the_jpeg_reward_room_to_move():
    """Same shapes, plain instead of textured backgrounds: clearly smaller JPEGs."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(toy_world.sample_batch(200, rng)[0])
    border = torch.cat(
        [images[:, :, :4, :].flatten(2), images[:, :, :, :4].flatten(2)], dim=2
    )  # never under the shape
    textured = border.std(dim=2).amax(dim=1) > 0.01
    sizes = jpeg_kilobytes(images)
    assert sizes[~textured].mean() < 0.7 * sizes[textured].mean()

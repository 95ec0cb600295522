"""Rewards (paper, section 5.1): JPEG size at quality 95, in kB; the pixel-wise colour rewards."""

import io

import pytest
import types

import torch
from PIL import Image

import toy_world
from ddpo import scalar
import rewards
from machinery import reward_specs
from rewards import jpeg_kilobytes, to_pil


def test_jpeg_size_is_the_file_size_at_quality_95():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    to_pil(images[:1])[0].save(buffer, format="JPEG", quality=95)
    assert jpeg_kilobytes(images)[0].item() == pytest.approx(buffer.tell() / 1000)


def test_flat_image_is_more_compressible_than_noise():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    scores = rewards.jpeg_compressibility(torch.cat([flat, noise]), ["a", "b"])
    assert scores.shape == (2,) and scores[0] > scores[1]
    torch.testing.assert_close(
        rewards.jpeg_incompressibility(torch.cat([flat, noise]), ["a", "b"]), -scores
    )


def test_to_pil_rounds_to_8_bit():
    image = to_pil(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))[0]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (0, 128, 255)


def test_pixel_color_is_a_map_of_closeness_to_the_target_and_its_mean_is_the_reward():
    images = torch.zeros(2, 3, 4, 4)
    images[0] = 1.0  # all white: the target
    images[1, :, 0, 0] = 1.0  # black with one white pixel
    reward_map = rewards.pixel_color(images, ["a", "b"], target=(1.0, 1.0, 1.0))
    assert reward_map.shape == (2, 4, 4)
    torch.testing.assert_close(reward_map[0], torch.ones(4, 4))
    assert reward_map[1, 0, 0] == 1.0 and reward_map[1, 1, 1] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(scalar(reward_map), torch.tensor([1.0, 1 / 16]))
    torch.testing.assert_close(scalar(torch.tensor([0.5, 2.0])), torch.tensor([0.5, 2.0]))


def test_pixel_background_scores_the_shape_by_its_prompts_colour_and_the_rest_by_the_target():
    image = torch.full((1, 3, 8, 8), 0.5)  # grey background
    image[0, :, 2:5, 2:5] = torch.tensor(toy_world.COLOURS["red"])[:, None, None]  # the red shape
    reward_map = rewards.pixel_background(image, ["a red square"], target=(1.0, 1.0, 1.0))
    assert reward_map.shape == (1, 8, 8)
    torch.testing.assert_close(
        reward_map[0, 2:5, 2:5], torch.ones(3, 3)
    )  # the shape in its colour: full marks
    grey = 1 - (torch.tensor([0.5, 0.5, 0.5]) - 1).norm() / 3**0.5
    torch.testing.assert_close(
        reward_map[0, 0], torch.full((8,), grey.item())
    )  # the background: closeness to white
    image[0, :, :2] = 1.0  # whiten two rows of background
    whitened = rewards.pixel_background(image, ["a red square"], target=(1.0, 1.0, 1.0))
    assert (whitened[0, :2] == 1).all() and torch.equal(
        whitened[0, 2:], reward_map[0, 2:]
    )  # credit stays where it was earned
    image[0, :, 2:5, 2:5] = 1.0  # a white shape is no longer the red one: it counts as background
    assert toy_world.colour_distance(image, ["a red square"])[0, 3, 3] > toy_world.MATCH_DISTANCE


def test_a_built_in_reward_is_given_its_declared_settings_as_keywords_of_the_same_name():
    cfg = types.SimpleNamespace(target=(0.0, 0.0, 0.0))
    reward = reward_specs.by_name(cfg, rewards.pixel_color, ("target",))
    black = torch.zeros(2, 3, 8, 8)
    assert torch.equal(reward(black, ["a", "b"]), torch.ones(2, 8, 8))  # the target itself: 1

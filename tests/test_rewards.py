"""Rewards (paper, section 5): JPEG size at quality 95, in kB."""
import io

import pytest
import torch
from PIL import Image

from rewards import REWARDS, jpeg_kilobytes, to_pil


def test_jpeg_size_is_the_file_size_at_quality_95():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    to_pil(images[:1])[0].save(buffer, format="JPEG", quality=95)
    assert jpeg_kilobytes(images)[0].item() == pytest.approx(buffer.tell() / 1000)


def test_flat_image_is_more_compressible_than_noise():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    rewards = REWARDS["jpeg"](torch.cat([flat, noise]), ["a", "b"])
    assert rewards.shape == (2,) and rewards[0] > rewards[1]
    torch.testing.assert_close(REWARDS["jpeg_incompressibility"](torch.cat([flat, noise]), ["a", "b"]), -rewards)


def test_to_pil_rounds_to_8_bit():
    image = to_pil(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))[0]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (0, 128, 255)

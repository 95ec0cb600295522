"""Rewards r(x_0, c): functions of a batch of images in [0, 1], shape (B, 3, H, W), and their
prompts, returning one float per image as a tensor of shape (B,), or, for a pixel-wise reward, a
map (B, H, W) whose mean over the pixels is the image's reward (`scalar`), so that every algorithm
can use it and PXPO can use the map itself.

`REWARDS` maps the names that `train.py --reward` accepts to these functions.
"""
import io

import numpy as np
import torch
from PIL import Image

import toy_world


def to_pil(images):
    """(B, 3, H, W) floats in [0, 1] -> list of 8-bit RGB PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def jpeg_kilobytes(images):
    """Size of each image saved as JPEG at quality 95, in kB (bytes / 1000) (paper, section 5)."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(np.array(sizes), dtype=torch.float32)


def jpeg_compressibility(images, prompts):
    """Minus the JPEG size: smaller files score higher."""
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images, prompts):
    """Plus the JPEG size: larger files score higher."""
    return jpeg_kilobytes(images)


def pixel_color(images, prompts, target=(1.0, 1.0, 1.0)):
    """Per-pixel closeness to a target RGB colour in [0, 1]: 1 - distance / sqrt(3), a map (B, H, W)
    in [0, 1] (1 where a pixel is the colour). Its scalar form is the mean closeness."""
    target = torch.as_tensor(target, dtype=torch.float32, device=images.device)[:, None, None]
    return 1 - (images.float() - target).norm(dim=1) / 3**0.5


def scalar(rewards):
    """One reward per image: a reward map's mean over its pixels, a scalar reward unchanged."""
    return rewards.flatten(1).mean(dim=1) if rewards.dim() > 1 else rewards


REWARDS = {
    "jpeg": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "pixel_color": pixel_color,  # pixel-wise: for PXPO (ddpo.py), and by its mean for the others
    "toy_alignment": toy_world.judge,  # the bundled model's stand-in for the paper's VLM alignment
}

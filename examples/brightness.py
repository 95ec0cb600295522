"""Your own reward, an example: the images' mean brightness, higher for brighter images.

    python train.py --reward examples/brightness.py:brightness --epochs 3

train.py calls it with each batch's images, a float tensor (B, 3, H, W) in [0, 1] on the training
device, and their B prompts; it returns B scores (a tensor, a numpy array or a list).
"""


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))

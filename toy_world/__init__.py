"""A small captioned image world for the bundled CPU model, and a judge of prompt fidelity.

Each 64 x 64 image shows one coloured shape ("a red circle") on a background that is either plain
or textured (stripes or a checkerboard in neutral tones). The caption never mentions the
background, so the pretrained model draws both kinds for every prompt: textured ones four times
in five in the training images, about half of the time in its samples (the UNet draws the
textures less often than it sees them). That is room for the JPEG reward to move (a plain
background compresses to well under half the bytes of a textured one) without changing what the
prompt asks for, which the judge checks. The judge is this world's stand-in for the paper's
vision-language alignment reward (section 5.3).
"""

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {  # saturated, far from each other and from the neutral backgrounds
    "red": (0.86, 0.14, 0.14),
    "green": (0.15, 0.68, 0.22),
    "blue": (0.16, 0.28, 0.88),
    "yellow": (0.95, 0.83, 0.12),
    "purple": (0.58, 0.18, 0.76),
}
SHAPES = ("circle", "square", "triangle")
PROMPTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
# Generalisation in miniature (the paper's section 6.3: what is learned on some prompts carries over
# to unseen ones): one shape per colour is held out of training, so every colour and every shape is
# trained on, but five of their combinations never are.
HELDOUT = [f"a {colour} {SHAPES[k % len(SHAPES)]}" for k, colour in enumerate(COLOURS)]
TRAIN = [prompt for prompt in PROMPTS if prompt not in HELDOUT]


def not_toy(prompts):
    """Why a reward that reads the toy world's prompts (pixel_background) cannot take these, or
    None when every one is the toy world's."""
    strangers = sorted(set(prompts) - set(PROMPTS))
    if strangers:
        return f"finds the shape by the toy world's colours, and {strangers[0]!r} is not one of its prompts: use shapes"


MATCH_DISTANCE = 0.3  # a pixel shows a colour if it is this close to it in RGB (0-1 units)


def neutral(rng):
    """A low-saturation tone: grey with a faint tint."""
    return np.clip(rng.uniform(0.1, 0.9) + rng.uniform(-0.04, 0.04, size=3), 0, 1)


def background(rng):
    """Plain one time in five; otherwise stripes (four orientations) or a checkerboard."""
    if rng.random() < 0.2:
        return np.broadcast_to(neutral(rng), (SIZE, SIZE, 3)).copy()
    light, dark = neutral(rng), neutral(rng)
    while np.abs(light - dark).mean() < 0.25:
        dark = neutral(rng)
    # 8-pixel bands on a fixed 16-pixel grid: coarse for the VAE's 8 x 8 cells, yet their edges cut
    # through JPEG's 8 x 8 blocks (offset 4), so they cost 2.5 to 5 times a plain background's bytes
    y, x = np.mgrid[:SIZE, :SIZE] + 4
    on = (y % 16 < 8, x % 16 < 8, (x + y) % 16 < 8, (x - y) % 16 < 8, (x // 8 + y // 8) % 2 == 0)[
        rng.integers(5)
    ]
    return np.where(on[..., None], light, dark)


def render(prompt, rng):
    """An image (SIZE, SIZE, 3) in [0, 1] of the world's prompt "a <colour> <shape>"."""
    colour, shape = parse(prompt)
    canvas = Image.fromarray((background(rng) * 255).round().astype(np.uint8))
    side = int(rng.integers(16, 29))
    x0, y0 = (int(v) for v in rng.integers(4, SIZE - side - 4, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    fill = tuple(int(round(c * 255)) for c in COLOURS[colour])
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
    return np.asarray(canvas, dtype=np.float32) / 255


def sample_batch(n, rng):
    """n images, an array (n, 3, SIZE, SIZE) in [0, 1], with their captions, prompts drawn uniformly."""
    prompts = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=n)]
    return np.stack([render(p, rng) for p in prompts]).transpose(0, 3, 1, 2), prompts


def parse(prompt):
    """(colour, shape) of a prompt of this world, or a ValueError naming the form it must take."""
    words = prompt.lower().split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(
            f"{prompt!r} is not a prompt of the toy world: use 'a <colour> <shape>' with {list(COLOURS)} and {list(SHAPES)}"
        )
    return colours[0], shapes[0]


def classify(mask):
    """The shape a boolean mask shows, from how much of its bounding box it fills (square ~1,
    circle ~0.79, triangle ~0.5), or None if it is not one compact blob of a shape's size."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 60:
        return None
    (y0, y1), (x0, x1) = (
        np.quantile(ys, [0.01, 0.99]),
        np.quantile(xs, [0.01, 0.99]),
    )  # robust to stray pixels
    height, width = y1 - y0 + 1, x1 - x0 + 1
    inside = mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum()
    filled = inside / (height * width)
    if min(height, width) < 8 or max(height, width) > 1.5 * min(height, width) or filled < 0.35:
        return None
    return "triangle" if filled < 0.65 else "circle" if filled < 0.9 else "square"


def colour_distance(images, prompts):
    """Each pixel's RGB distance (B, H, W) to its prompt's colour; below MATCH_DISTANCE it shows it."""
    pixels = images.detach().float()
    target = pixels.new_tensor([COLOURS[parse(prompt)[0]] for prompt in prompts])[:, :, None, None]
    return (pixels - target).norm(dim=1)


def judge(images, prompts):
    """Prompt fidelity of each image (B, 3, H, W) in [0, 1]: 1 if it shows the prompt's shape in
    the prompt's colour, 0.5 if a blob of the right colour has the wrong shape, 0 otherwise."""
    scores = []
    for mask, prompt in zip(
        (colour_distance(images, prompts) < MATCH_DISTANCE).cpu().numpy(), prompts
    ):
        seen = classify(mask)
        scores.append(0.0 if seen is None else 1.0 if seen == parse(prompt)[1] else 0.5)
    return images.new_tensor(scores).float().cpu()


def fidelity_judge(prompts):
    """The judge of these prompts' fidelity, or None when they are not all of one of the toy's
    worlds: judge for the shapes, words.colour_fidelity (the asked colour) for the words."""
    from toy_world import words  # here: words imports this module

    if set(prompts) <= set(PROMPTS):
        return judge
    if set(prompts) <= set(words.PROMPTS):
        return words.colour_fidelity
    return None

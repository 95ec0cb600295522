"""The toy world's words: 64 x 64 images of one short word in capitals, for the OCR reward.

Each image shows one word of WORDS in one of the world's colours, drawn in PIL's default font at
16 to 22 px near the centre of a plain light neutral background, captioned `the word "CAT" in red`: the
quotes are what the OCR reward reads (machinery/learned_rewards/ocr.py). The OCR model reads every
word drawn here exactly; the bundled model tiny-words draws them less well, which leaves its OCR
reward room to rise. Yellow is left out: on a light background it is too faint to read.
`colour_fidelity` is the world's judge of what the OCR reward does not check: the asked colour.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import toy_world

SIZE = toy_world.SIZE
WORDS = ("CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "MAP", "PEN", "SKY", "BUS", "FOX")
COLOURS = {name: rgb for name, rgb in toy_world.COLOURS.items() if name != "yellow"}
PROMPTS = [f'the word "{word}" in {colour}' for word in WORDS for colour in COLOURS]
# as for the shapes: one colour per word is held out of training, every word and colour trained on
HELDOUT = [
    f'the word "{word}" in {list(COLOURS)[k % len(COLOURS)]}' for k, word in enumerate(WORDS)
]
TRAIN = [prompt for prompt in PROMPTS if prompt not in HELDOUT]
FONT_SIZES = range(16, 23)
JITTER = 4  # pixels the word moves from the centre, either way on each axis
MIN_INK = 30  # pixels of a colour that make a word in it (a 16 px word drawn here shows 70 or more)


def parse(prompt):
    """(word, colour) of a prompt of this world, or a ValueError naming the form it must take."""
    parts = prompt.split('"')
    colour = parts[-1].split()[-1] if len(parts) == 3 and parts[-1].split() else None
    if parts[0] != "the word " or parts[1] not in WORDS or colour not in COLOURS:
        raise ValueError(
            f"{prompt!r} is not a prompt of the words world: use 'the word \"<WORD>\" in <colour>' "
            f"with {list(WORDS)} and {list(COLOURS)}"
        )
    return parts[1], colour


def render(prompt, rng):
    """An image (SIZE, SIZE, 3) in [0, 1] of the prompt's word in its colour."""
    word, colour = parse(prompt)
    tone = np.clip(rng.uniform(0.75, 0.95) + rng.uniform(-0.04, 0.04, size=3), 0, 1)
    canvas = Image.new("RGB", (SIZE, SIZE), tuple(int(round(c * 255)) for c in tone))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=int(rng.choice(FONT_SIZES)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x, y = (SIZE - (right - left)) // 2 - left, (SIZE - (bottom - top)) // 2 - top  # centred
    x, y = x + rng.integers(-JITTER, JITTER + 1), y + rng.integers(-JITTER, JITTER + 1)
    draw.text(
        (int(x), int(y)), word, fill=tuple(int(round(c * 255)) for c in COLOURS[colour]), font=font
    )
    return np.asarray(canvas, dtype=np.float32) / 255


def sample_batch(n, rng, prompts=TRAIN):
    """n images (n, 3, SIZE, SIZE) in [0, 1] with their captions, drawn uniformly from prompts."""
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    return np.stack([render(p, rng) for p in chosen]).transpose(0, 3, 1, 2), chosen


def colour_fidelity(images, prompts):
    """1 for each image (B, 3, H, W) in [0, 1] that shows its prompt's colour, else 0: at least
    MIN_INK pixels within toy_world.MATCH_DISTANCE of it, and no fewer than of any other colour."""
    import torch  # here, not above: --help reads the prompt sets before torch loads

    pixels = images.detach().float().cpu()
    close = torch.stack(
        [
            (
                (pixels - pixels.new_tensor(rgb)[:, None, None]).norm(dim=1)
                < toy_world.MATCH_DISTANCE
            )
            .flatten(1)
            .sum(1)
            for rgb in COLOURS.values()
        ],
        dim=1,
    )  # (B, colours)
    asked = torch.tensor([list(COLOURS).index(parse(p)[1]) for p in prompts])
    shown = close.gather(1, asked[:, None]).squeeze(1)
    return ((shown >= MIN_INK) & (shown >= close.amax(1))).float()

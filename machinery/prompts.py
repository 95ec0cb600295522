"""The prompt sets of --prompts and --eval-prompts: built-in ones (data/README.md) or a text file,
one prompt a line. train.draw_prompts draws c ~ p(c) from the set."""

from pathlib import Path

import toy_world
from toy_world import words
from machinery.errors import fail

DATA = Path(__file__).resolve().parents[1] / "data"


def read_lines(path):
    """A text file's non-blank lines, stripped; UTF-8, with or without the byte-order mark some
    editors write first (utf-8-sig drops it: it is not part of the first line)."""
    return [
        line.strip()
        for line in Path(path).read_text(encoding="utf-8-sig").splitlines()
        if line.strip()
    ]


PROMPT_SETS = {
    "imagenet_animals": lambda: read_lines(DATA / "imagenet_classes.txt")[:398],
    "simple_animals": lambda: read_lines(DATA / "simple_animals.txt"),
    "animal_activities": lambda: [
        f"{'an' if animal[0] in 'aeiou' else 'a'} {animal} {activity}"
        for animal in read_lines(DATA / "simple_animals.txt")
        for activity in read_lines(DATA / "activities.txt")
    ],
    "shapes": lambda: toy_world.PROMPTS,
    "shapes_train": lambda: toy_world.TRAIN,  # 10 of the 15, for training
    "shapes_heldout": lambda: toy_world.HELDOUT,  # the other 5, never trained on
    "words": lambda: words.PROMPTS,  # the words world's 48 (toy_world/words.py)
    "words_train": lambda: words.TRAIN,  # 36 of them, which tiny-words was pretrained on
    "words_heldout": lambda: words.HELDOUT,  # the other 12
}


def load_prompts(name, flag="--prompts"):
    """A built-in prompt set (data/README.md) or a text file, one prompt a line."""
    if name in PROMPT_SETS:
        return PROMPT_SETS[name]()
    if not Path(name).is_file():
        fail(
            f"{flag} {name}: no such set or file; use one of {', '.join(PROMPT_SETS)} or a text "
            "file"
        )
    try:
        prompts = read_lines(name)
    except (OSError, UnicodeDecodeError) as error:
        fail(
            f"{flag} {name}: not a readable text file ({type(error).__name__}); give a UTF-8 text "
            "file, one prompt a line"
        )
    if not prompts:
        fail(f"{flag} {name}: the file has no prompts; write one prompt a line")
    return prompts

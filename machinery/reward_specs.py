"""What --reward and --rewards name, read without loading a model: the built-in rewards, each
declared once in REWARDS (the name, where its function is, the settings it takes, what is checked
before anything loads); your own function (FILE.py:NAME or module:NAME); a served one (a URL).
The names --reward accepts, its help and the checks come from here; reward_loading.py loads them.
Each built-in reward's own settings (its model's id, its target) are fields of RewardSettings, here
too: Config takes them as flags.

To add a built-in reward: its function (rewards.py, machinery/learned_rewards/, or a module of
yours), one line in REWARDS, and its settings, if any, in RewardSettings.
"""

import functools
import hashlib
import importlib.util
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# --help's group of the rewards' own settings
SETTINGS = "each built-in reward's own settings (docs/rewards.md)"


def setting(default, help):
    """A reward's setting: its default and its --help line, in the SETTINGS group."""
    return field(default=default, metadata=dict(help=help, group=SETTINGS))


@dataclass
class RewardSettings:
    """The settings the built-in rewards take (a reward names its own in REWARDS' options); Config
    inherits them, so each is a flag of train.py and of reward_server.py."""

    target_color: str = setting(
        "1,1,1", "pixel_color, pixel_background: the target colour as R,G,B in [0, 1]"
    )
    aesthetic_model: str = setting(
        "openai/clip-vit-large-patch14",
        "aesthetic: the CLIP model (hub id or folder) under LAION's aesthetic head",
    )
    alignment_model: str = setting(
        "llava-hf/llava-1.5-7b-hf",
        "alignment: the vision-language model (hub id or folder) that describes each image",
    )
    bertscore_model: str = setting(
        "microsoft/deberta-xlarge-mnli", "alignment: the model whose embeddings BERTScore compares"
    )
    bertscore_layer: int = setting(
        40,
        "alignment: its hidden layer used by BERTScore (40: bert_score's choice for "
        "deberta-xlarge-mnli)",
    )
    clipscore_model: str = setting(
        "openai/clip-vit-large-patch14", "clipscore: the CLIP model (hub id or folder)"
    )
    pickscore_model: str = setting(
        "yuvalkirstain/PickScore_v1", "pickscore: the PickScore model (hub id or folder)"
    )
    pickscore_processor: str = setting(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "pickscore: the processor of its images and prompts (hub id or folder), CLIP-H's",
    )
    ocr_detect: bool = setting(
        None,
        "ocr: find the text boxes before reading them (PP-OCR's detector, as Flow-GRPO), or read "
        "the whole image as one line (--no-ocr-detect); default: detect in images larger than "
        "128 px (the bundled world's 64 px words are read whole)",
    )


def colour(cfg):
    """--target-color R,G,B as three floats."""
    return [float(v) for v in cfg.target_color.split(",")]


def with_target(cfg, function, options):
    """A pixel reward with its target colour (--target-color)."""
    return functools.partial(function, target=colour(cfg))


def learned(cfg, build, options):
    """A learned reward built around its models, named by its settings, on the run's device."""
    return build(*(getattr(cfg, name) for name in options), device=cfg.device)


def by_name(cfg, function, options):
    """The reward with each of its settings passed as the keyword of the same name."""
    return functools.partial(function, **{name: getattr(cfg, name) for name in options})


@dataclass(frozen=True)
class Reward:
    """A built-in reward. function: "module:name", the reward itself, or what make builds it from:
    make(cfg, function, options) -> the reward. options: the settings (Config's fields) it takes,
    by default passed as keywords of the same name. models: the settings that name a model, and
    what kind of folder each is (checked before anything loads). prompts: "module:name" of a
    function that returns what is wrong with a prompt set for this reward (None: nothing), checked
    when the prompts load."""

    function: str
    options: tuple = ()
    make: Callable = by_name
    models: dict = field(default_factory=dict)
    prompts: str = None


REWARDS = {
    "jpeg": Reward("rewards:jpeg_compressibility"),  # paper, section 5.1
    "jpeg_incompressibility": Reward("rewards:jpeg_incompressibility"),
    "pixel_color": Reward("rewards:pixel_color", ("target_color",), with_target),  # for PXPO
    "pixel_background": Reward(
        "rewards:pixel_background", ("target_color",), with_target, prompts="toy_world:not_toy"
    ),
    "toy_alignment": Reward("toy_world:judge"),  # the bundled model's stand-in for section 5.3's
    "aesthetic": Reward(  # section 5.2
        "machinery.reward_loading:aesthetic_reward",
        ("aesthetic_model",),
        learned,
        {"aesthetic_model": "a CLIP model folder"},
    ),
    "alignment": Reward(  # section 5.3
        "machinery.reward_loading:alignment_reward",
        ("alignment_model", "bertscore_model", "bertscore_layer"),
        learned,
        {"alignment_model": "a vision-language model folder", "bertscore_model": "a model folder"},
    ),
    "clipscore": Reward(  # Flow-GRPO's CLIP score
        "machinery.learned_rewards.clipscore:load",
        ("clipscore_model",),
        learned,
        {"clipscore_model": "a CLIP model folder"},
    ),
    "pickscore": Reward(  # human preference, Pick-a-Pic
        "machinery.learned_rewards.pickscore:load",
        ("pickscore_model", "pickscore_processor"),
        learned,
        {"pickscore_model": "a CLIP model folder"},
    ),
    "ocr": Reward(  # Flow-GRPO's text rendering
        "machinery.learned_rewards.ocr:load",
        ("ocr_detect",),
        learned,
        prompts="machinery.learned_rewards.ocr:unreadable",
    ),
}
REWARD_NAMES = tuple(REWARDS)
# --reward FILE.py:NAME or module:NAME, your own function
OWN_REWARD = re.compile(r"(?P<where>.+):(?P<name>[A-Za-z_]\w*)")
# how config.json names a reward function given to train.main(reward_fn=...):
# python:module.qualname
PYTHON = "python:"


def imported(where):
    """The function that "module:name" names, imported now."""
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def function(reward):
    """The function a REWARDS entry names, imported now."""
    return imported(reward.function)


def is_url(spec):
    """--reward http://HOST:PORT/PATH: a served reward (served.py)."""
    return spec.startswith(("http://", "https://"))


def short_reward_name(spec):
    """The reward's part of a default run folder's name: the built-in's name, your function's, or
    served-<the URL path's last part, or its host>."""
    if not is_url(spec):
        return spec.rpartition(":")[2]
    parts = urllib.parse.urlsplit(spec)
    last = [p for p in parts.path.split("/") if p][-1:] or [parts.hostname or "reward"]
    return "served-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in last[0])


def split_term(term):
    """--rewards' SPEC=WEIGHT -> (SPEC, WEIGHT), split at the last = (a URL may hold one); the
    weight None when it is missing or not a number."""
    spec, equals, weight = term.rpartition("=")
    try:
        return (spec, float(weight)) if equals and spec else (term, None)
    except ValueError:
        return term, None


def combined_name(terms):
    """--rewards' sum as the run names it (config.json's reward, the console): 1 jpeg + 0.5
    brightness."""
    parts = [(short_reward_name(spec), weight) for spec, weight in map(split_term, terms)]
    return "sum: " + " + ".join(f"{weight:g} {name}" for name, weight in parts)


def own_reward_file(spec):
    """The file that holds your own reward, FILE.py:NAME's or module:NAME's (None for a built-in
    one)."""
    own = OWN_REWARD.fullmatch(spec)
    if spec in REWARDS or spec.startswith(PYTHON) or is_url(spec) or not own:
        return None
    where = own["where"]
    if where.endswith(".py"):
        return Path(where)
    try:
        found = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        found = None
    return Path(found.origin) if found is not None and found.has_location else None


def file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()

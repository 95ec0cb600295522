"""The words world (toy_world/words.py) and the bundled model that writes, toy_world/tiny-words:
the OCR model reads the words the world draws, the colour judge, and the model's tokens, its
preset, and one epoch on the OCR reward (tests/test_bundled.py loads and samples it offline)."""

import json
import os

import numpy as np
import pytest
import torch

import toy_world
import train
from machinery import cli, config
from machinery.learned_rewards import ocr
from machinery.pipeline import load_pipeline
from toy_world import words


@pytest.fixture(scope="module")
def reward():
    return ocr.load()


def drawn(prompts, seed=0):
    """The world's image of each prompt: (B, 3, 64, 64) in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = np.stack([words.render(p, rng) for p in prompts]).transpose(0, 3, 1, 2)
    return torch.from_numpy(images)


def test_the_ocr_model_reads_the_words_the_world_draws_exactly(reward):
    prompts = words.PROMPTS * 2  # each word in each colour, at two draws of size and place
    scores = reward(drawn(prompts), prompts)
    misread = [(p, r) for p, r, s in zip(prompts, reward.readings, scores) if s < 1]
    assert len(misread) <= 1, misread  # one in 96 here: a green CAT read as GAT
    assert reward.details["exact"].tolist() == (scores == 1).float().tolist()


def test_the_share_read_exactly_counts_only_scores_of_1(reward):
    prompts = ['the word "CAT" in red', 'the word "DOG" in blue']
    scores = reward(drawn(prompts), ['the word "CAT" in red', 'the word "DOT" in blue'])
    assert scores.tolist() == pytest.approx([1, 2 / 3])
    assert reward.details["exact"].tolist() == [1, 0]


def test_colour_fidelity_is_1_in_the_asked_colour_and_0_in_another():
    prompts = words.PROMPTS
    images = drawn(prompts, seed=1)
    assert (words.colour_fidelity(images, prompts) == 1).all()
    colours = list(words.COLOURS)
    other = [
        p.rsplit(" ", 1)[0] + " " + colours[colours.index(words.parse(p)[1]) - 1] for p in prompts
    ]
    assert (words.colour_fidelity(images, other) == 0).all()


def test_colour_fidelity_is_0_for_a_blank_image_and_for_grey_letters():
    blank = torch.full((1, 3, 64, 64), 0.85)
    grey = blank.clone()
    grey[:, :, 20:40, 10:50] = 0.3  # plenty of ink, in no colour of the world
    prompts = ['the word "CAT" in red'] * 2
    assert words.colour_fidelity(torch.cat([blank, grey]), prompts).tolist() == [0, 0]


def test_the_judge_of_a_prompt_set_is_its_worlds():
    assert toy_world.fidelity_judge(words.PROMPTS) is words.colour_fidelity
    assert toy_world.fidelity_judge(toy_world.PROMPTS) is toy_world.judge
    assert toy_world.fidelity_judge([toy_world.PROMPTS[0], words.PROMPTS[0]]) is None


def test_a_prompt_outside_the_world_is_refused_naming_its_form():
    assert words.parse('the word "FOX" in purple') == ("FOX", "purple")
    for prompt in ('the word "COW" in red', 'the word "CAT" in yellow', "a red circle"):
        with pytest.raises(ValueError, match="the word"):
            words.parse(prompt)


def test_each_word_is_trained_in_three_colours_and_held_out_in_one():
    for word in words.WORDS:
        assert sum(f'"{word}"' in p for p in words.TRAIN) == 3
        assert sum(f'"{word}"' in p for p in words.HELDOUT) == 1
    assert set(words.TRAIN) | set(words.HELDOUT) == set(words.PROMPTS)


def test_tiny_words_reads_each_world_word_as_one_token():
    tokenizer = load_pipeline(config.BUNDLED_WORDS_MODEL).tokenizer
    for prompt in words.PROMPTS:
        tokens = tokenizer.tokenize(prompt)
        assert len(tokens) == 7 and tokens[3] == f"{words.parse(prompt)[0].lower()}</w>", tokens


def test_tiny_words_gets_the_words_preset(tmp_path):
    model = str(config.BUNDLED_WORDS_MODEL)
    cfg = cli.parse_args(["--model", model, "--reward", "ocr", "--out", str(tmp_path / "run")])
    assert cfg.preset == "words" and cfg.prompts == "words"
    assert cfg.num_steps == config.PRESETS["tiny"]["num_steps"]


def test_one_epoch_of_tiny_words_trains_on_the_ocr_reward_and_logs_the_exact_share(tmp_path):
    out = tmp_path / "run"
    flags = ["--model", str(config.BUNDLED_WORDS_MODEL), "--reward", "ocr", "--out", str(out)]
    small = ["--epochs", "1", "--samples-per-epoch", "8", "--batch-size", "4", "--num-steps", "4"]
    train.main([*flags, *small, "--sample-batch-size", "8", "--updates-per-epoch", "2"])
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= row["reward_exact"] <= 1 and 0 <= row["reward_mean"] <= 1
    assert row["reward_exact"] <= row["reward_mean"] + 1e-6  # an exact read scores 1
    assert 0 <= row["fidelity"] <= 1  # the colour judge, on the words world's prompts
    assert os.path.isdir(out / "lora")

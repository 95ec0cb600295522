"""The OCR reward (--reward ocr, Flow-GRPO's text reward) on words drawn by PIL, read by the real
PP-OCR models shipped in the rapidocr wheel: nothing is downloaded (the tests block the network)."""

import json
import socket

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import train
from machinery.learned_rewards import ocr

WORDS = ["CAT", "HELLO", "SUN", "KEY", "OCR"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any connection attempt fails the test: the models must come from the wheel (and the tiny
    pipeline from its folder: HF_HUB_OFFLINE)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the OCR reward tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def reward():
    return ocr.load()


def drawn(words, size=(128, 64), at=(6, 20), colour="black"):
    """Each word drawn in PIL's default font at 20 px on white: (B, 3, H, W) in [0, 1]."""
    font = ImageFont.load_default(size=20)
    pictures = []
    for word in words:
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).text(at, word, fill=colour, font=font)
        pictures.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(pictures)


def test_the_word_the_prompt_quotes_scores_1_when_drawn_exactly(reward):
    scores = reward(drawn(WORDS), [f'a sign that says "{word}"' for word in WORDS])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0] * len(WORDS)
    assert reward.readings == WORDS


def test_a_blank_image_scores_0(reward):
    assert reward(drawn([""]), ['a sign that says "HELLO"']).tolist() == [0.0]


def test_one_letter_wrong_scores_one_minus_one_over_the_length(reward):
    prompts = ['"CAB"', 'the word "HELLA"', '"SUNNY"']  # CAT, HELLO, SUN drawn
    scores = reward(drawn(["CAT", "HELLO", "SUN"]), prompts)
    torch.testing.assert_close(scores, torch.tensor([1 - 1 / 3, 1 - 1 / 5, 1 - 2 / 5]))


def test_the_target_is_between_the_first_quotes_without_spaces_or_case(reward):
    prompts = ['"h e l l o" then "X"', 'a "cat" and a "dog"', 'says "Sun "']
    assert reward(drawn(["HELLO", "CAT", "SUN"]), prompts).tolist() == [1.0, 1.0, 1.0]


def test_a_target_found_inside_the_reading_scores_1(reward):
    assert reward(drawn(["CATS"]), ['"cat"']).tolist() == [1.0]


@pytest.mark.math
def test_the_edit_distance_counts_insertions_deletions_and_substitutions():
    pairs = {("kitten", "sitting"): 3, ("", "abc"): 3, ("flaw", "lawn"): 2, ("abc", "abc"): 0}
    assert {pair: ocr.edit_distance(*pair) for pair in pairs} == pairs


@pytest.mark.math
def test_every_score_is_in_0_1_the_distance_capped_at_the_targets_length():
    assert ocr.ocr_score("WXYZWXYZ", "ab") == 0.0  # distance 8, capped at 2
    assert ocr.ocr_score("", "ab") == 0.0
    assert ocr.ocr_score("a,b", "AB") == 0.5  # punctuation kept, as Flow-GRPO
    rng = np.random.default_rng(0)
    letters = list("abc ,")
    for _ in range(200):
        reading = "".join(rng.choice(letters, size=rng.integers(0, 8)))
        text = "".join(rng.choice(letters[:3], size=rng.integers(1, 6)))
        assert 0.0 <= ocr.ocr_score(reading, text) <= 1.0


def test_noise_scores_in_0_1(reward):
    noise = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores = reward(noise, ['"HELLO"'] * 4)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_detection_reads_a_small_word_in_a_large_image_and_is_the_default_there(reward):
    image = drawn(["HELLO"], size=(320, 320), at=(180, 250))
    assert ocr.load(detect=True)(image, ['"HELLO"']).tolist() == [1.0]
    assert reward(image, ['"HELLO"']).tolist() == [1.0]  # larger than 128 px: detected in
    assert ocr.load(detect=False)(drawn(["HELLO"]), ['"HELLO"']).tolist() == [1.0]


def test_a_prompt_without_quoted_text_is_refused_in_one_line_when_the_prompts_load(
    tiny_run, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "OPEN"\na cat on a sign\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        train.main(tiny_run(out, 1, "--reward", "ocr", "--prompts", str(prompts)))
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(error) == 1, error
    assert "'a cat on a sign' quotes no text" in error[0] and "--reward ocr" in error[0]
    assert not out.exists()


def test_one_epoch_trains_on_the_ocr_reward(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('the word "CAT" in red\nthe word "SUN" in blue\n')
    out = tmp_path / "run"
    train.main(tiny_run(out, 1, "--reward", "ocr", "--prompts", str(prompts)))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["reward_mean"] <= 1.0

"""--reward ocr: text rendering scored by an OCR model, Flow-GRPO's text reward (Liu et al. 2025,
arXiv 2505.05470, section 5.1; its code: flow_grpo/ocr.py, OcrScorer.__call__). The prompt's text
between its first two double quotes is the target; the reward is 1 minus the edit distance between
what the OCR model reads and the target, over the target's length.

As Flow-GRPO: spaces removed and lower case on both sides, punctuation kept; a distance of 0 when
the target is found inside the reading, at most the target's length (the reward is in [0, 1]);
an image where nothing is read scores 0. Where it differs: Flow-GRPO runs PaddleOCR (English
models, detection on, angle classifier off) and hands it RGB arrays where PaddleOCR expects BGR;
this runs the same family of models, PaddleOCR's PP-OCR as ONNX, shipped inside the `rapidocr`
wheel (nothing is downloaded), and hands it the channels in the order it expects.

Detection finds the text boxes first and reads each, joined in the detector's order as Flow-GRPO
joins them: needed when the text is small in a large picture, or in several lines (a Stable
Diffusion sign or poster). Recognition alone reads the whole image as one line of text, which
suits an image whose text is one line across it (the bundled world's 64 px words), at a tenth of
the cost (docs/rewards.md). By default images larger than AUTO_DETECT pixels are detected in.
"""

import numpy as np

AUTO_DETECT = 128  # --ocr-detect's default: detect in images with a side larger than this


def target(prompt):
    """The text the image should show: between the prompt's first two double quotes."""
    return prompt.split('"')[1]


def unreadable(prompts):
    """Why the OCR reward cannot score these prompts (None: each quotes a text to render)."""
    for prompt in prompts:
        if prompt.count('"') < 2 or not target(prompt).strip():
            return (
                f"the prompt {prompt!r} quotes no text for the OCR model to read; write the text "
                'to render between double quotes, e.g. a sign that says "OPEN"'
            )
    return None


def normalise(text):
    """Flow-GRPO's comparison: no spaces, lower case."""
    return text.replace(" ", "").lower()


def edit_distance(a, b):
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            previous, row[j] = (
                row[j],
                min(row[j] + 1, row[j - 1] + 1, previous + (char_a != char_b)),
            )
    return row[-1]


def ocr_score(reading, text):
    """1 - d / len(text), d the edit distance from what was read to the text (0 if the text is in
    the reading; at most len(text)), after normalise."""
    reading, text = normalise(reading), normalise(text)
    distance = 0 if text in reading else min(edit_distance(reading, text), len(text))
    return 1 - distance / len(text)


def ocr(read):
    """The reward, given read(image) -> the text an OCR model reads in an 8-bit BGR image (H, W, 3).
    Its `readings` hold what was read in the last batch, for a look; its `details`, which images
    were read exactly (the run logs their share as reward_exact)."""

    import torch  # here, not above: checks.py reads unreadable() before torch loads

    def score(images, prompts):
        pixels = images.detach().float().clamp(0, 1).mul(255).round().byte()
        bgr = pixels.flip(1).permute(0, 2, 3, 1).cpu().numpy()
        score.readings = [read(np.ascontiguousarray(image)) for image in bgr]
        scores = [ocr_score(reading, target(p)) for reading, p in zip(score.readings, prompts)]
        scores = torch.tensor(scores, dtype=torch.float32, device=images.device)
        score.details = {"exact": (scores == 1).float()}
        return scores

    return score


def load(detect=None, device="cpu"):
    """The reward on PP-OCR's models as the rapidocr wheel ships them, run by onnxruntime on the
    CPU; detect: find the text boxes first (--ocr-detect; None: in images larger than
    AUTO_DETECT). One image at a time, through the library's own call (docs/rewards.md times a
    batch through its recogniser)."""
    try:
        from rapidocr import RapidOCR
    except ImportError as error:
        raise OSError(
            f"--reward ocr: {error.name} is not installed; pip install -r requirements.txt "
            "(rapidocr and onnxruntime, at the versions tested)"
        ) from error
    engine = RapidOCR(params={"Global.log_level": "error", "Global.text_score": 0.0})

    def read(image):
        boxes = max(image.shape[:2]) > AUTO_DETECT if detect is None else detect
        result = engine(image, use_det=boxes, use_cls=False, use_rec=True)
        return "".join(result.txts or ())

    return ocr(read)

"""Seconds a batch of each reward takes here, beside JPEG's: the OCR reward on the real PP-OCR
models of the rapidocr wheel, on words drawn by PIL; the CLIP score and PickScore on CLIP ViT-L/14
and ViT-H/14 built at their published shapes with random weights (the hub is out of reach here; a
batch's cost depends on the shapes, not on the weights' values).

    python benchmarks/reward_cost.py --keep docs/rewards/cost.json --page docs/rewards.md
    python benchmarks/reward_cost.py --reduced      # a smoke test: tiny CLIPs, small batches

Each case is called --repeats times on one batch, taking turns with the others; the first call
warms up and is not counted. The table gives each case's median seconds a batch and a picture.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery.learned_rewards import ocr  # noqa: E402
from machinery.learned_rewards.clipscore import similarity  # noqa: E402
from page import parse_with_result_flags, provenance, report  # noqa: E402
from rewards import jpeg_compressibility  # noqa: E402
from toy_world.pretrain import make_tokenizer  # noqa: E402

WORDS = ["CAT", "HELLO", "SUN", "OPEN", "KEY", "RIVER", "MAP", "STOP"]
PROMPTS = ["a photo of a cat riding a bike", "a red fox in the snow", "a bowl of ramen at night"]
# the published shapes: openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K
CLIP_SHAPES = {
    "ViT-L/14": dict(text=(768, 12, 12), vision=(1024, 24, 16), projection=768),
    "ViT-H/14": dict(text=(1024, 24, 16), vision=(1280, 32, 16), projection=1024),
    "tiny": dict(text=(32, 1, 2), vision=(32, 1, 2), projection=16),
}


def words(n, size, font_size, seed=0):
    """n pictures of a word each, black on white at a random place: (n, 3, size, size) in [0, 1],
    and their prompts, the word in quotes."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=font_size)
    pictures, prompts = [], []
    for k in range(n):
        word = WORDS[k % len(WORDS)]
        image = Image.new("RGB", (size, size), "white")
        width = font.getlength(word)
        at = rng.uniform(0, size - width), rng.uniform(0, size - 1.3 * font_size)
        ImageDraw.Draw(image).text(at, word, fill="black", font=font)
        pictures.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
        prompts.append(f'a sign that says "{word}"')
    return torch.stack(pictures), prompts


def clip(shape, image_size):
    """A CLIPModel of the shape's widths, depths and heads (random weights), and its processor."""
    (text, text_layers, text_heads), (vision, layers, heads) = shape["text"], shape["vision"]
    tokenizer = make_tokenizer(" ".join(PROMPTS).split(), max_length=77)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=text,
            intermediate_size=4 * text,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=vision,
            intermediate_size=4 * vision,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=14,
        ),
        projection_dim=shape["projection"],
    )
    crop = {"height": image_size, "width": image_size}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop),
        tokenizer=tokenizer,
    )
    return CLIPModel(config).eval(), processor


def batched_recognition(batch):
    """The OCR reward's recognition through the recogniser's own batching, `batch` pictures a
    forward: rapidocr's TextRecognizer, reached through an internal of the library (the reward
    itself reads one picture at a time through its public call)."""
    from rapidocr import RapidOCR
    from rapidocr.ch_ppocr_rec.typings import TextRecInput

    engine = RapidOCR(params={"Global.log_level": "error", "Rec.rec_batch_num": batch})
    recognise = engine._load_rec_model()

    def score(images, prompts):
        pixels = images.detach().float().clamp(0, 1).mul(255).round().byte()
        bgr = [np.ascontiguousarray(a) for a in pixels.flip(1).permute(0, 2, 3, 1).numpy()]
        readings = recognise(TextRecInput(img=bgr)).txts
        return [ocr.ocr_score(r, ocr.target(p)) for r, p in zip(readings, prompts)]

    return score


def cases(reduced):
    """(name, model, picture size, reward, images, prompts) of each case."""
    sd, bundled = (64, 64) if reduced else (512, 64)
    batch = 2 if reduced else 8
    images, prompts = words(batch, sd, sd // 10)
    small, small_prompts = words(4 if reduced else 64, bundled, 16)
    photos = [PROMPTS[k % len(PROMPTS)] for k in range(batch)]
    yield "jpeg", "", sd, jpeg_compressibility, images, photos
    yield "ocr", "PP-OCRv6 recognition", bundled, ocr.load(False), small, small_prompts
    for batch in (6, 64):
        recognise = batched_recognition(batch)
        yield (
            "ocr",
            f"recognition, its batches of {batch}",
            bundled,
            recognise,
            small,
            small_prompts,
        )
    yield (
        "ocr --ocr-detect",
        "PP-OCRv6 detection + recognition",
        bundled,
        ocr.load(True),
        small,
        small_prompts,
    )
    yield (
        "ocr --ocr-detect",
        "PP-OCRv6 detection + recognition",
        sd,
        ocr.load(True),
        images,
        prompts,
    )
    for name, shape, scale in (("clipscore", "ViT-L/14", 1 / 30), ("pickscore", "ViT-H/14", 1.0)):
        shape = "tiny" if reduced else shape
        model, processor = clip(CLIP_SHAPES[shape], 28 if reduced else 224)
        yield name, f"CLIP {shape}", sd, similarity(model, processor, scale=scale), images, photos


def measure(reduced, repeats):
    """Each case's seconds a batch, the cases taking turns."""
    chosen = list(cases(reduced))
    seconds = [[] for _ in chosen]
    for _ in range(repeats):
        for k, (_, _, _, reward, images, prompts) in enumerate(chosen):
            start = time.perf_counter()
            reward(images, prompts)
            seconds[k].append(time.perf_counter() - start)
    return [
        dict(reward=name, model=model, size=size, batch=len(prompts), seconds=values[1:])
        for (name, model, size, _, _, prompts), values in zip(chosen, seconds)
    ]


def table(result):
    lines = [
        "| `--reward` | its model | pictures | a batch | median s a batch | ms a picture |",
        "|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        median = statistics.median(case["seconds"])
        lines.append(
            f"| `{case['reward']}` | {case['model'] or '-'} | {case['size']} x {case['size']} | "
            f"{case['batch']} | {median:.3f} | {1000 * median / case['batch']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=6, help="calls of each case; 1 warms up")
    parser.add_argument("--reduced", action="store_true", help="tiny CLIPs and batches")
    args = parse_with_result_flags(parser, argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: the first warms up")
    command = f"python benchmarks/reward_cost.py --repeats {args.repeats}"
    command += " --reduced" if args.reduced else ""
    result = {"cases": measure(args.reduced, args.repeats), "command": command, **provenance()}
    result["threads"] = torch.get_num_threads()
    return report(args, "reward_cost", result, table)


if __name__ == "__main__":
    main()

"""Peak GPU memory and samples per second of DDPO on the Stable Diffusion v1.4 architecture.

    python benchmarks/gpu_memory.py                             # bf16, LoRA rank 4, 512 px, train batch 1 to 4
    python benchmarks/gpu_memory.py --gradient-checkpointing
    python benchmarks/gpu_memory.py --arch tiny --device cpu --batch-sizes 1 --num-steps 2   # the tests' reduced mode

Nothing is downloaded: SD v1.4's UNet, VAE and CLIP text encoder are built from their published
configs with random weights (same shapes, same work as the trained ones) and saved as a pipeline
folder; the tokenizer is the toy world's, whose ids fall inside CLIP's 49,408-entry vocabulary. For
each train batch size B, train.py runs in this process for 2 epochs of 2 batches (the paper's 50
DDIM steps, guidance 5, every step trained, rank-4 LoRA, the frozen networks in --mixed-precision),
and the second epoch is reported: samples per second sampled, trained, and for the whole epoch.
Peak memory covers the whole run (torch.cuda.max_memory_allocated). Prints a markdown table.
"""

import argparse
import contextlib
import gc
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_world  # noqa: E402
import train  # noqa: E402
from machinery.pipeline import DTYPES  # noqa: E402
from toy_world.pretrain import SD14_SCHEDULER, build_pipeline, make_tokenizer  # noqa: E402

WORDS = ["a", *toy_world.COLOURS, *toy_world.SHAPES]  # the prompt set "shapes", one token a word


def sd14_unet():
    """SD v1.4's UNet (CompVis/stable-diffusion-v1-4's unet/config.json), random weights: 860 M parameters."""
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sd14_random_pipeline():
    """SD v1.4's architecture (CompVis/stable-diffusion-v1-4's configs), random weights."""
    unet = sd14_unet()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14's text tower
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(WORDS, max_length=77),
        unet=unet,
        scheduler=DDIMScheduler(**SD14_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def measure(model, batch, args, extra=()):
    """One train.py run of 2 epochs x 2 batches (extra: more of its flags): (peak GiB or None, sample/s, train/s, epoch/s) of its second epoch."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        history = train.main(
            [
                "--model",
                str(model),
                "--device",
                args.device,
                "--epochs",
                "2",
                "--samples-per-epoch",
                str(2 * batch),
                "--batch-size",
                str(batch),
                "--updates-per-epoch",
                "1",
                "--num-steps",
                str(args.num_steps),
                "--guidance-scale",
                "5",
                "--timestep-fraction",
                "1",
                "--lora-rank",
                "4",
                "--mixed-precision",
                args.mixed_precision,
                "--prompts",
                "shapes",
                "--reward",
                "jpeg",
                "--seed",
                "0",
                "--out",
                f"{tmp}/run",
                *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
                *extra,
            ]
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    last = history[-1]
    return (
        peak,
        2 * batch / last["sample_seconds"],
        2 * batch / last["train_seconds"],
        2 * batch / (last["sample_seconds"] + last["train_seconds"]),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch",
        choices=("sd14", "tiny"),
        default="sd14",
        help="SD v1.4's architecture, or a tiny one for a smoke test",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--mixed-precision", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device here; use a GPU machine, or --arch tiny --device cpu for a smoke test"
        )
    start = time.time()
    pipe = (
        sd14_random_pipeline()
        if args.arch == "sd14"
        else build_pipeline(image_size=64, words=WORDS, seed=0)
    )
    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(folder)
        del pipe
        print(f"built and saved the {args.arch} architecture in {time.time() - start:.0f} s")
        device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        print(
            f"\n{device}, {args.mixed_precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
            f"{args.num_steps} DDIM steps, guidance 5, every step trained, LoRA rank 4\n"
        )
        print(
            "| train batch | peak memory (GiB) | sampling samples/s | training samples/s | epoch samples/s |"
        )
        print("|---|---|---|---|---|")
        rows = []
        for batch in args.batch_sizes:
            rows.append((batch, *measure(folder, batch, args)))
            peak, sampling, training, epoch = rows[-1][1:]
            print(
                f"| {batch} | {'-' if peak is None else f'{peak:.1f}'} | {sampling:.3f} | {training:.3f} | {epoch:.3f} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()

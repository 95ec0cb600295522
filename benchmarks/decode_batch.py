"""Seconds to decode an epoch's latents, a few images at a time or all at once.

    python benchmarks/decode_batch.py                       # the bundled model's 64 latents
    python benchmarks/decode_batch.py --keep docs/speed/decode_batch.json --page docs/speed.md

The VAE decodes the bundled model's 64 latents (4 x 8 x 8, into 64 x 64 images), in chunks of 64,
32, 16 and 8, the chunk sizes taking turns, --repeats times each; the first two repeats warm up and
are not counted. The table gives each chunk size's median and fastest seconds, and its median
against decoding all 64 at once. train.py decodes --batch-size images at a time
(sample_trajectories' decode_batch_size), which is what this measures.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery.config import BUNDLED_MODEL  # noqa: E402
from machinery.pipeline import load_pipeline  # noqa: E402
from page import parse_with_result_flags, provenance, report  # noqa: E402
from sampler import decode  # noqa: E402

CHUNKS = (64, 32, 16, 8)


def measure(model, repeats, samples=64):
    """Each chunk size's seconds to decode `samples` latents, repeats times, taking turns."""
    pipe = load_pipeline(str(model))
    config = pipe.unet.config
    shape = (samples, config.in_channels, config.sample_size, config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    seconds = {size: [] for size in CHUNKS}
    with torch.no_grad():
        for _ in range(repeats):
            for size in CHUNKS:
                start = time.perf_counter()
                [decode(pipe, chunk) for chunk in latents.split(size)]
                seconds[size].append(time.perf_counter() - start)
    return {str(size): values[2:] for size, values in seconds.items()}


def table(result):
    whole = statistics.median(result["seconds"][str(CHUNKS[0])])
    lines = [
        "| images a decode | median s | fastest s | median / all at once |",
        "|---|---|---|---|",
    ]
    for size, values in result["seconds"].items():
        median = statistics.median(values)
        lines.append(f"| {size} | {median:.3f} | {min(values):.3f} | {median / whole:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=12, help="decodes of each size; 2 warm up")
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    args = parse_with_result_flags(parser, argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3: the first two warm up")
    command = f"python benchmarks/decode_batch.py --repeats {args.repeats}"
    result = {"seconds": measure(args.model, args.repeats), "command": command, **provenance()}
    return report(args, "decode_batch", result, table)


if __name__ == "__main__":
    main()

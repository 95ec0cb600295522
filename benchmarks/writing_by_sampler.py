"""How well the bundled words model writes under each sampler: DDIM's noise eta and the guidance w.

    python benchmarks/writing_by_sampler.py
    python benchmarks/writing_by_sampler.py --keep docs/learns-to-write/writing_by_sampler.json \
        --page docs/learns-to-write.md

toy_world/tiny-words samples --per-prompt images of each of the 48 `words` prompts at 20 steps,
from the same seed, once for each (eta, w) of SETTINGS (eta 0: every step deterministic, the ODE
that DiffusionNFT samples with; eta 1: DDPO's policy; w 1: no guidance, NFT's), and the OCR reward
reads them: the share read exactly, the mean OCR reward, and the colour asked for
(words.colour_fidelity).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery.config import BUNDLED_WORDS_MODEL  # noqa: E402
from machinery.learned_rewards import ocr  # noqa: E402
from machinery.pipeline import load_pipeline  # noqa: E402
from page import parse_with_result_flags, provenance, report  # noqa: E402
from sampler import sample_trajectories  # noqa: E402
from toy_world import words  # noqa: E402

# (eta, guidance w): the preset's policy first (eta 1, w 3)
SETTINGS = ((1.0, 3.0), (0.5, 3.0), (0.0, 3.0), (0.0, 5.0), (1.0, 1.0), (0.0, 1.0))
STEPS = 20


def measure(model, per_prompt, seed=0):
    """Each setting's exact share, mean OCR reward and colour fidelity on the same prompts."""
    read, pipe = ocr.load(), load_pipeline(str(model))
    prompts = [p for p in words.PROMPTS for _ in range(per_prompt)]
    rows = []
    for eta, w in SETTINGS:
        generator = torch.Generator().manual_seed(seed)
        stochastic = torch.full((STEPS,), eta > 0)  # eta 0: sample_trajectories' DDIM steps
        with torch.no_grad():
            images = sample_trajectories(
                pipe,
                prompts,
                STEPS,
                w,
                eta=eta or 1.0,
                batch_size=64,
                generator=generator,
                policy=pipe.family.POLICY,
                stochastic=stochastic,
            )["images"]
        scores = read(images, prompts)
        colour = words.colour_fidelity(images, prompts)
        rows.append(
            {
                "eta": eta,
                "guidance": w,
                "exact": (scores == 1).float().mean().item(),
                "ocr": scores.mean().item(),
                "colour": colour.float().mean().item(),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(result):
    lines = [
        "| eta | guidance w | read exactly | OCR reward | colour asked for |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['eta']:g} | {r['guidance']:g} | {r['exact']:.1%} | {r['ocr']:.3f} "
            f"| {r['colour']:.3f} |"
        )
    n = result["per_prompt"] * len(words.PROMPTS)
    return (
        "\n".join(lines) + f"\n\n{n} images a setting ({result['per_prompt']} a prompt), 20 steps."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-prompt", type=int, default=4, help="images of each prompt")
    parser.add_argument("--model", default=str(BUNDLED_WORDS_MODEL))
    args = parse_with_result_flags(parser, argv)
    command = f"python benchmarks/writing_by_sampler.py --per-prompt {args.per_prompt}"
    rows = measure(args.model, args.per_prompt)
    result = {"rows": rows, "per_prompt": args.per_prompt, "command": command, **provenance()}
    return report(args, "writing_by_sampler", result, table)


if __name__ == "__main__":
    main()

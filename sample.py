"""Images from a trained run: its weights beside the base model's, from the same noise.

    python sample.py runs/<run>                                   # 8 of the run's prompts, seed 0
    python sample.py runs/<run> --prompts "a red circle" "a blue square" --num-images 4 --seed 1

It samples as the run was trained and scored: with the run's DDIM steps, guidance and eta (from
its config.json). eta 1, the paper's and the default, draws fresh noise at every step, so each
image is one draw of the policy that was trained; `--eta 0` is deterministic DDIM, the mean path
(what a plain `pipe(prompt)` does), which the policy was never trained or scored on. A flow model
(SD3) likewise takes the run's SDE steps at its --noise-level (0: the ODE, a plain `pipe(prompt)`).

The weights go through diffusers' own loading, as anyone would use them:
`load_lora_weights(run/lora)` into a stock pipeline, or the saved `unet/` after a full fine-tune.
It writes into a folder it names (--out; default RUN/generated/<time>): grid.png (the base model's
row above the run's, each image captioned with its prompt and, for a built-in reward, its reward)
and each image as base_K.png and tuned_K.png.
"""

import argparse
import json
import os
import time
import types
from pathlib import Path

from safetensors import SafetensorError, safe_open

from machinery import config, errors
from machinery.checks import check_writable
from machinery.devices import DEVICE, cuda_available
from machinery.errors import fail
from machinery.prompts import load_prompts

SPEAKING = errors.speaking_as("sample.py")  # its one-line refusals, and the machinery's, say who


@SPEAKING
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.error = fail
    parser.add_argument("run", help="a run folder of train.py (its config.json and lora/ or unet/)")
    parser.add_argument(
        "--prompts", nargs="+", help="the prompts, in turn; default the run's own, in order"
    )
    parser.add_argument("--num-images", type=int, default=8, help="images per side (default: 8)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the noise, the same for both sides (default: 0)"
    )
    parser.add_argument(
        "--eta",
        type=float,
        help="DDIM noise level; default the run's (1: as trained; 0: deterministic DDIM)",
    )
    parser.add_argument(
        "--noise-level",
        type=float,
        help="flow models (SD3): the SDE step's noise level a; default the run's (0: the ODE)",
    )
    parser.add_argument("--device", help="torch device; default cuda when available, else cpu")
    parser.add_argument("--out", help="the folder to write; default RUN/generated/<time>")
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(
            f"{run}: no readable config.json ({type(error).__name__}); give the folder of a run "
            "train.py wrote"
        )
    weights = [run / name for name in ("lora", "unet") if (run / name).is_dir()]
    if not weights:
        fail(f"{run}: no lora/ or unet/ yet (the run writes them after its first epoch)")
    check_weights(weights[0], run, saved)
    if args.num_images < 1:
        fail(f"--num-images must be at least 1, got {args.num_images}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        fail(f"--eta must be in [0, 1], got {args.eta}")
    if args.noise_level is not None and args.noise_level < 0:
        fail(f"--noise-level must be >= 0, got {args.noise_level}")
    copy = run / config.PROMPTS_COPY
    where = str(copy) if copy.is_file() else saved.get("prompts", "")
    prompts = args.prompts or load_prompts(where, "the run's prompts")
    args.prompts = [prompts[k % len(prompts)] for k in range(args.num_images)]
    args.eta = saved.get("eta", 1.0) if args.eta is None else args.eta
    if args.noise_level is None:
        args.noise_level = saved.get("noise_level", config.Config.noise_level)
    args.device = args.device or ("cuda" if cuda_available() else "cpu")
    if not DEVICE.fullmatch(args.device):  # its form; whether torch can use it, once it loads
        fail(f"--device {args.device}: not a torch device; use cpu, or cuda, mps or xpu, with :N")
    args.out = Path(args.out or run / "generated" / time.strftime("%Y%m%d-%H%M%S"))
    check_writable(args.out)
    return args, saved, weights[0]


def check_weights(weights, run, saved):
    """The run's trained weights readable before anything loads: each safetensors file whole (its
    header and the size it declares), and a saved UNet's config.json."""
    again = (
        "restore it from a copy, or let the run write it again after one more epoch: python "
        f"train.py --resume {run} --epochs {saved.get('epochs', 0) + 1}"
    )
    files = sorted(weights.glob("*.safetensors"))
    if not files:
        fail(f"{weights}: no .safetensors file in it; {again}")
    if weights.name == "unet":
        try:
            json.loads((weights / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            fail(f"{weights / 'config.json'}: unreadable ({type(error).__name__}); {again}")
    for path in files:
        try:
            with safe_open(path, "numpy"):
                pass
        except (OSError, SafetensorError) as error:
            fail(f"{path}: damaged or cut short ({error}); {again}")


if __name__ == "__main__":  # a bad flag or run folder answers here, before torch and diffusers load
    cli_args = parse_args()

for library in (
    "TRANSFORMERS",
    "DIFFUSERS",
):  # before they are imported: keep the console for results
    os.environ.setdefault(f"{library}_VERBOSITY", "error")

import torch  # noqa: E402
from machinery.parallel import check_device  # noqa: E402
from machinery.pipeline import load_pipeline  # noqa: E402
from ddpo import scalar  # noqa: E402
from machinery.reward_loading import load_reward  # noqa: E402
from machinery.reward_specs import REWARDS, imported, learned  # noqa: E402
from rewards import to_pil  # noqa: E402
from machinery.epoch_log import save_grid  # noqa: E402


@SPEAKING
def main(argv=None):
    """argv: sample.py's arguments (or their parse, already made). Returns the two sides' images,
    base and tuned, each (N, 3, H, W) in [0, 1]."""
    args, saved, weights = argv if isinstance(argv, tuple) else parse_args(argv)
    check_device(args.device)
    try:
        pipe = load_pipeline(saved["model"], args.device, noise_level=args.noise_level)
    except OSError as error:  # moved, deleted, or a hub id neither cached nor reachable
        fail(
            f"{args.run}: its model {saved['model']} (config.json) cannot be loaded "
            f"({type(error).__name__}); put it back there, or download it first"
        )
    flow_model = pipe.family.NOISE == "noise_level"  # SD3's SDE step: --noise-level, not --eta

    def sample():
        generator = torch.Generator(args.device).manual_seed(args.seed)
        steps, guidance = saved["num_steps"], saved["guidance_scale"]
        options = dict(num_inference_steps=steps, guidance_scale=guidance)
        if flow_model:  # SD3's pipeline draws each SDE step's noise from torch's own generator
            torch.manual_seed(args.seed)
        else:
            options["eta"] = args.eta
        return pipe(args.prompts, **options, generator=generator, output_type="pt").images

    base = sample()
    if weights.name == "lora":
        pipe.load_lora_weights(weights)
    else:  # a full fine-tune's UNet (or SD3 transformer)
        tuned = type(pipe.unet).from_pretrained(weights).to(args.device)
        setattr(pipe, pipe.family.DENOISER, tuned)
    tuned = sample()
    # the built-in rewards without a model are cheap, and load_reward makes them as the run did
    # (pixel_color's target); your own and the learned ones are not called, nor one that cannot
    # read these prompts (ocr's without quoted text)
    spec = REWARDS.get(saved["reward"])
    unreadable = spec is not None and spec.prompts and imported(spec.prompts)(args.prompts)
    cheap = spec is not None and spec.make is not learned and not unreadable
    reward = load_reward(types.SimpleNamespace(**saved)) if cheap else None
    scores = [
        scalar(reward(images, args.prompts)).tolist() if reward else [None] * len(args.prompts)
        for images in (base, tuned)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    captions = [
        f"{side}: {prompt[:16]}" + ("" if score is None else f"\n{saved['reward']} {score:.2f}")
        for side, side_scores in zip(("base", "tuned"), scores)
        for prompt, score in zip(args.prompts, side_scores)
    ]
    save_grid(
        torch.cat([base, tuned]),
        captions,
        args.out / "grid.png",
        size=max(128, min(256, base.shape[-1])),
        cols=len(args.prompts),
    )
    for side, images in (("base", base), ("tuned", tuned)):
        for k, picture in enumerate(to_pil(images)):
            picture.save(args.out / f"{side}_{k}.png")
    print(
        f"{len(args.prompts)} prompts, base and tuned from the same noise (seed {args.seed}, "
        f"{saved['num_steps']} steps, guidance {saved['guidance_scale']}, "
        f"{f'noise level {args.noise_level}' if flow_model else f'eta {args.eta}'}) -> "
        f"{args.out / 'grid.png'}"
    )
    return base, tuned


if __name__ == "__main__":
    main(cli_args)

"""The settings of a training run: one Config dataclass, filled by argparse from train.py's flags.

Defaults are the paper's settings for SD v1.4 (appendix D.1 and D.5), but for the LoRA at 3e-4 (the
public PyTorch port's default; the paper's main runs fine-tune the whole UNet, --lora-rank 0). A
preset rescales them for another model ("tiny": the bundled CPU model); every flag given on the
command line still wins. Bad input is refused before anything is loaded or written (checks.py): one
line, exit status 2. This module imports neither torch nor diffusers (seconds to load), so that
--help, --show-config and a bad flag answer at once: train.py parses its flags before its own
imports.
"""

from dataclasses import dataclass, field
from pathlib import Path

from machinery.prompts import PROMPT_SETS
from machinery.reward_specs import REWARD_NAMES, SETTINGS, RewardSettings

ROOT = Path(__file__).resolve().parents[1]  # the repository
BUNDLED_MODEL = ROOT / "toy_world" / "tiny-shapes"
BUNDLED_FLOW_MODEL = ROOT / "toy_world" / "tiny-flow"  # SD3's shape (docs/flow-models.md)
BUNDLED_WORDS_MODEL = ROOT / "toy_world" / "tiny-words"  # writes words (docs/learns-to-write.md)
SD14 = "CompVis/stable-diffusion-v1-4"
# the run folder's lock file (run_folder.claim): a folder holding only it counts as empty
LOCK = ".lock"
# in the run folder: a resumed run reads its prompts there
PROMPTS_COPY, EVAL_PROMPTS_COPY = "prompts.txt", "eval_prompts.txt"
# --help's groups, in this order: the paper's settings, the extensions, the run's machinery
PAPER = "the paper's settings: model, reward, prompts, sampling, the algorithm and its update"
BEYOND = (
    "beyond the paper: rewards combined, the KL leash, the evaluation, DDPO's successors, speed"
)
RUN = "the run: its folder, resume, processes, precision, trackers, a served reward"
GROUPS = (PAPER, SETTINGS, BEYOND, RUN)

# The paper's settings scaled to the bundled model on a 2-core CPU
# (docs/cpu-demo.md, "The bundled model and its preset"). The clip range grows by
# sqrt(16384 / 256) = 8: the mean log-ratio over the 256 latent elements of a 4 x 8 x 8 latent is
# that much noisier than over SD's 16,384.
PRESETS = {
    "paper": {},
    "tiny": dict(
        prompts="shapes",
        num_steps=20,
        guidance_scale=3.0,
        epochs=35,
        samples_per_epoch=64,
        batch_size=16,
        sample_batch_size=64,
        steps_per_forward=5,
        timestep_fraction=0.5,
        lr=5e-3,
        clip_range=8e-4,
    ),
}
# tiny-words: the tiny preset on the words world's prompts; its latents have 16 x 8 x 8 elements,
# so the clip range is tiny's over sqrt(1024 / 256) = 2
PRESETS["words"] = {**PRESETS["tiny"], "prompts": "words", "clip_range": 4e-4}
# the preset --preset auto picks for each bundled model (any other model: the paper's)
BUNDLED_PRESETS = {BUNDLED_MODEL: "tiny", BUNDLED_FLOW_MODEL: "tiny", BUNDLED_WORDS_MODEL: "words"}
# Each algorithm's own settings: over the preset's, under the tuned ones and the flags given.
ALGO_SETTINGS = {
    # DDPO_IS: 4 clipped updates per epoch (minibatches of 64); DDPO_SF and PXPO: on-policy, one
    "ddpo-is": dict(updates_per_epoch=4),
    "ddpo-sf": dict(updates_per_epoch=1),
    "pxpo": dict(updates_per_epoch=1),
    # RWR as the original code runs it: a round's samples are regressed on in 5 passes
    # ("num_train_epochs": 5), dense weights over the whole round (not per prompt; its
    # compressibility runs), sparse RWR's top 10 % per prompt where a prompt has enough samples,
    # else over the rest of the round (ddpo.sparse_rwr_weights)
    "rwr": dict(updates_per_epoch=4, inner_epochs=5, per_prompt_stat_tracking=False),
    "rwr-sparse": dict(updates_per_epoch=4, inner_epochs=5),
    # beyond the paper: AWM, DDPO_IS's clipped ratio on the pretraining loss (machinery/matching.py)
    "awm": dict(updates_per_epoch=4),
    # beyond the paper: DiffusionNFT, guidance-free, beta 1 as its code (config/nft.py); nft.py
    "nft": dict(updates_per_epoch=4, guidance_scale=1.0, beta=1.0),
}
ALGOS = tuple(ALGO_SETTINGS)
# the on-policy ones: one update on each epoch's samples (checks.check_algorithm refuses more)
ON_POLICY = ("ddpo-sf", "pxpo")
# The bundled model's learning rate (and RWR's beta) for each reward and algorithm, as chosen by
# `python benchmarks/compare.py --stage tune` on 15-epoch runs
# (docs/algorithms.md, "Compared on equal budgets").
# DDPO_IS on jpeg keeps the preset's 5e-3: it is the CPU demo's setting, measured over the demo's 35
# epochs; the 15-epoch tuning preferred 1.6e-2 (docs/algorithms.md says both).
TUNED = {
    "tiny": {
        ("jpeg", "ddpo-sf"): dict(lr=5e-3),
        ("jpeg", "rwr"): dict(lr=1.6e-3, beta=6.0),
        ("jpeg", "rwr-sparse"): dict(lr=5e-4),
        ("pixel_background", "ddpo-is"): dict(lr=5e-3),
        ("pixel_background", "ddpo-sf"): dict(lr=1.6e-3),
        ("pixel_background", "pxpo"): dict(lr=1.6e-3),
        # compare.py's tuning (docs/algorithms/tune/awm/; time_to_target.py's chose 3.2e-3)
        ("jpeg", "awm"): dict(lr=1.6e-3),
        ("jpeg", "nft"): dict(lr=2e-2),  # time_to_target.py's (it collapsed on 1 of 3 seeds)
    },
}


def arg(default, help, group=PAPER, **kwargs):
    """A setting: its default, its --help line and group, and argparse's options for its flag."""
    return field(default=default, metadata=dict(help=help, group=group, **kwargs))


@dataclass
class Config(RewardSettings):
    # model
    model: str = arg(
        "auto",
        "hub id or local folder of a pipeline of a family in machinery/families/; auto: "
        f"{SD14} with CUDA, else the bundled {BUNDLED_MODEL.name}",
    )
    preset: str = arg(
        "auto",
        "settings to start from: the paper's, tiny for the bundled models on a CPU, words for "
        "tiny-words; auto: the bundled model's own, else the paper's",
        choices=("auto", *PRESETS),
    )
    lora_rank: int = arg(
        4, "rank of the LoRA on the UNet's attention projections; 0 fine-tunes the whole UNet"
    )
    # task
    reward: str = arg(
        "jpeg",
        f"reward function: one of {', '.join(REWARD_NAMES)} "
        '(docs/rewards.md, "The built-in rewards"), your own as FILE.py:NAME or module:NAME '
        '(docs/rewards.md, "Your own reward"), or a served one, http://HOST:PORT/PATH '
        "(docs/reward-server.md)",
    )
    rewards: list = arg(
        None,
        "instead of --reward, a weighted sum of rewards: each term SPEC=WEIGHT, SPEC as --reward "
        "takes it (split at its last =), the weight always given, e.g. --rewards jpeg=1 "
        "examples/brightness.py:brightness=0.5",
        nargs="+",
        type=str,
        group=BEYOND,
    )
    prompts: str = arg(
        "imagenet_animals",
        f"a built-in prompt set ({', '.join(PROMPT_SETS)}) or a text file, one prompt a line",
    )
    # sampling (paper, appendix D.5: 50 steps, guidance 5; DDIM with eta 1 as the original code
    # samples)
    num_steps: int = arg(50, "DDIM steps T per trajectory")
    guidance_scale: float = arg(5.0, "classifier-free guidance weight w, part of the policy")
    eta: float = arg(1.0, "DDIM noise level; must be > 0 for the step to have a log-prob")
    noise_level: float = arg(
        0.7,
        "flow models (SD3, FLUX): the noise level a of Flow-GRPO's SDE step, "
        "sigma_t = a sqrt(t / (1 - t)) (machinery/families/sd3.py); must be > 0 for the step to "
        "have a log-prob",
        group=BEYOND,
    )
    # algorithm (paper, sections 4.2-4.3; settings from appendix D.1 and D.5)
    algo: str = arg(
        "ddpo-is",
        "DDPO_IS (clipped importance sampling), DDPO_SF (REINFORCE), reward-weighted regression "
        "(dense or top 10 %%), pixel-wise PXPO (ddpo.py); beyond the paper, AWM "
        "(machinery/matching.py) and DiffusionNFT (machinery/nft.py)",
        choices=ALGOS,
    )
    epochs: int = arg(100, "epochs, each one round of sampling and updates")
    samples_per_epoch: int = arg(256, "trajectories sampled per epoch")
    batch_size: int = arg(8, "trajectories per forward pass in training (memory and speed only)")
    sample_batch_size: int = arg(
        None,
        "trajectories per forward pass in sampling (memory and speed only); default --batch-size",
    )
    steps_per_forward: int = arg(
        1,
        "training: trained steps of each trajectory in one forward and backward (memory and speed "
        "only)",
        group=BEYOND,
    )
    updates_per_epoch: int = arg(
        None,
        "optimiser steps per pass over an epoch's samples; default 4 for ddpo-is and rwr "
        "(minibatches of 64), 1 for ddpo-sf and pxpo",
    )
    inner_epochs: int = arg(
        1,
        "passes over each epoch's samples (the original's RWR: 5, set by --algo rwr and "
        "rwr-sparse)",
    )
    timestep_fraction: float = arg(
        1.0, "fraction of each trajectory's steps trained on, drawn per sample"
    )
    clip_range: float = arg(1e-4, "PPO clip range eps on the per-element (mean-reduced) ratio")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    per_prompt_stat_tracking: bool = arg(
        True, "normalise rewards per prompt (else over the batch); rwr: weights per prompt"
    )
    buffer_size: int = arg(32, "rewards kept per prompt for its statistics")
    min_count: int = arg(16, "rewards a prompt needs before its own statistics replace the batch's")
    beta: float = arg(0.2, "rwr: inverse temperature of exp(beta * r); nft: its beta, 1 by default")
    nft_decay: int = arg(
        1,
        "nft: the sampling policy's EMA decay schedule after s optimiser steps, DiffusionNFT's "
        "decay types: 0, none (it is the trained weights each epoch); 1, min(0.001 s, 0.5); 2, 0 "
        "for 75 steps, then min(0.0075 (s - 75), 0.999)",
        choices=(0, 1, 2),
        group=BEYOND,
    )
    # beyond the paper: what DDPO's successors changed
    # (successors.py; docs/extensions.md, "What DDPO's successors changed")
    samples_per_prompt: int = arg(
        1,
        "trajectories of each drawn prompt in an epoch, a group (1: every sample draws its own "
        "prompt, the paper's)",
        group=BEYOND,
    )
    advantages: str = arg(
        "tracker",
        "tracker: the paper's normalisation (per prompt, or over the batch with "
        "--no-per-prompt-stat-tracking); group: within each group of --samples-per-prompt (GRPO's)",
        choices=("tracker", "group"),
        group=BEYOND,
    )
    shared_noise: bool = arg(
        False, "each group of --samples-per-prompt starts from one x_T (DanceGRPO)", group=BEYOND
    )
    train_window: int = arg(
        0,
        "only this many consecutive steps, drawn each epoch, sample with eta and are trained; the "
        "others are deterministic DDIM steps (MixGRPO); 0: every step",
        group=BEYOND,
    )
    eval_num_steps: int = arg(
        None, "DDIM steps of the fixed-noise evaluation; default --num-steps", group=BEYOND
    )
    pxpo_normalise: str = arg(
        "prompt",
        "pxpo: each latent position's reward against its prompt's statistics of the scalar "
        "rewards (prompt), or against its prompt's running mean and std at that position "
        "(position)",
        choices=("prompt", "position"),
    )
    # overoptimisation: a leash to the base model and a held-out evaluation (not in the paper)
    kl_coef: float = arg(
        0.0,
        "weight of the KL(policy || base model) penalty on the trained steps (0: the paper's "
        "DDPO; leash.policy_kl); nft: of its code's squared distance to the base prediction",
        group=BEYOND,
    )
    eval_every: int = arg(
        0,
        "epochs between fixed-noise evaluations (0: none), and always of the base model and of "
        "the final weights",
        group=BEYOND,
    )
    eval_prompts: str = arg(
        None,
        "the evaluation's prompts: a built-in set or a text file; default --prompts",
        group=BEYOND,
    )
    eval_samples: int = arg(
        64,
        "images per evaluation, the prompts in turn, from the same noise every time",
        group=BEYOND,
    )
    # optimiser (AdamW, paper's settings)
    lr: float = arg(None, "learning rate; default 3e-4 with LoRA, 1e-5 for the whole UNet")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient norm clip")
    # system
    seed: int = arg(0, "seed for prompts, noise, shuffling and LoRA init")
    out: str = arg(None, "run folder; default runs/<reward>-<algo>-<time>", group=RUN)
    mixed_precision: str = arg(
        "no",
        "frozen networks in this dtype and the forwards autocast to it; the LoRA stays fp32",
        choices=("no", "fp16", "bf16"),
        group=RUN,
    )
    gradient_checkpointing: bool = arg(
        False,
        "recompute the UNet's activations in the backward pass: less memory, more time",
        group=RUN,
    )
    compile: bool = arg(
        False,
        "torch.compile the UNet for sampling and training; the first epoch pays the compiling "
        '(docs/speed.md, "Does compiling pay for itself in the demo?")',
        group=BEYOND,
    )
    allow_tf32: bool = arg(
        True, "TF32 matmuls and convolutions on CUDA (Ampere and newer)", group=RUN
    )
    device: str = arg(None, "torch device; default cuda when available, else cpu", group=RUN)
    log_with: str = arg(
        "none",
        "also send each epoch's metrics, sample grid and the settings to tensorboard "
        "(RUN/tensorboard) or wandb; each an optional package: pip install tensorboard, or wandb",
        choices=("none", "tensorboard", "wandb"),
        group=RUN,
    )
    checkpoint_every: int = arg(
        1,
        "epochs between checkpoints (checkpoints/epoch_N.pt: everything --resume needs)",
        group=RUN,
    )
    keep_checkpoints: int = arg(2, "checkpoints kept, the latest ones", group=RUN)
    reward_timeout: float = arg(
        120.0,
        "a served reward: seconds a request may take, its wait behind other processes' requests "
        'included (docs/reward-server.md, "What the run does with it")',
        group=RUN,
    )
    reward_retries: int = arg(
        3,
        "a served reward: tries after a failed request, waiting 1, 2, 4 ... s, before it stops",
        group=RUN,
    )
    reward_format: str = arg(
        "png",
        "a served reward: how images travel, 8-bit PNG (what the built-in rewards see) or float32",
        choices=("png", "float32"),
        group=RUN,
    )
    resume: str = arg(
        None,
        "continue the run in this folder from its last checkpoint, with its saved settings "
        "(--epochs may extend it)",
        group=RUN,
    )
    run_id: str = arg(
        None,
        "not a flag: a new one for each run, kept in config.json and in its checkpoints (resume "
        "refuses another's)",
        flag=False,
    )
    reward_sha256: str = arg(
        None, "not a flag: the sha256 of your own reward's file, which --resume checks", flag=False
    )
    rewards_sha256: dict = arg(
        None, "not a flag: --rewards' files and their sha256, which --resume checks", flag=False
    )


def base_needed(cfg):
    """Whether the run holds the base policy (leash.base_policy): for the KL leash (--kl-coef >
    0), for the evaluation's eval_kl_to_base (--eval-every), and with a LoRA, where it is the
    adapter switched off and costs nothing, for the kl_to_base that ddpo-is, ddpo-sf and pxpo log.
    A full fine-tune (--lora-rank 0) without the leash and the evaluation makes no frozen copy of
    the UNet and logs no kl_to_base."""
    return (
        cfg.kl_coef > 0
        or bool(cfg.eval_every)
        or (cfg.lora_rank > 0 and not cfg.algo.startswith("rwr"))
    )

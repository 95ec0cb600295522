"""Bad input refused before anything is loaded or written: one line naming the flag or file and the
fix, exit status 2 (errors.fail). cli.parse_args calls these on every new or resumed run's
settings; like config.py, this module imports neither torch nor diffusers.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import urllib.parse
from pathlib import Path

from machinery.config import LOCK, ON_POLICY, Config
from machinery.devices import DEVICE, world_size
from machinery.errors import fail
from machinery.prompts import load_prompts
from machinery.reward_specs import (
    OWN_REWARD,
    PYTHON,
    REWARDS,
    file_sha256,
    imported,
    is_url,
    own_reward_file,
    split_term,
)


def validate(cfg):
    """Refuse bad input before anything is loaded or written."""
    check_numbers(cfg)
    check_algorithm(cfg)
    world = world_size()  # processes under torchrun: each samples its share
    if cfg.samples_per_epoch % (world * cfg.updates_per_epoch * cfg.batch_size):
        fail(
            f"--samples-per-epoch ({cfg.samples_per_epoch}) must be a multiple of processes x "
            f"--updates-per-epoch x --batch-size ({world} x {cfg.updates_per_epoch} x "
            f"{cfg.batch_size})"
        )
    check_successors(cfg, world)
    check_model("--model", cfg.model, "a pipeline folder", "model_index.json")
    check_system(cfg)
    specs = [split_term(term)[0] for term in cfg.rewards] if cfg.rewards else [cfg.reward]
    if cfg.rewards:
        check_terms(cfg.rewards)
    else:
        check_reward(cfg.reward)
    check_built_in_rewards(cfg, specs)
    if not cfg.resume:
        check_out(Path(cfg.out))


POSITIVE_COUNTS = (
    "num_steps epochs samples_per_epoch batch_size sample_batch_size steps_per_forward "
    "updates_per_epoch inner_epochs buffer_size min_count checkpoint_every keep_checkpoints "
    "eval_samples samples_per_prompt eval_num_steps"
).split()


def check_numbers(cfg):
    """Every number in its range: finite, counts >= 1, rates > 0, and what the arithmetic allows
    but no one means."""
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in POSITIVE_COUNTS:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eta", "noise_level", "clip_range", "lr", "adv_clip_max", "beta", "max_grad_norm"):
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "kl_coef", "eval_every", "reward_retries", "bertscore_layer"):
        if getattr(cfg, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.eta > 1:
        fail(
            "--eta must be in (0, 1] (1: the DDPM posterior's noise, the paper's setting), got "
            f"{cfg.eta}"
        )
    if cfg.guidance_scale < 1:
        fail(
            "--guidance-scale must be >= 1 (1: no guidance; the paper: 5), got "
            f"{cfg.guidance_scale}"
        )
    for name in ("num_steps", "eval_num_steps"):
        if (getattr(cfg, name) or 0) > 1000:
            fail(
                f"--{name.replace('_', '-')} must be at most the 1000 training timesteps of "
                f"Stable Diffusion 1.x, got {getattr(cfg, name)}"
            )
    if cfg.lora_rank < 0:
        fail(f"--lora-rank must be >= 0 (0 = whole UNet), got {cfg.lora_rank}")
    if not cfg.reward_timeout > 0:
        fail(f"--reward-timeout must be > 0 seconds, got {cfg.reward_timeout}")
    if not 0 < cfg.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1], got {cfg.timestep_fraction}")
    try:
        target = [float(v) for v in cfg.target_color.split(",")]
    except ValueError:
        target = []
    if len(target) != 3 or not all(0 <= v <= 1 for v in target):
        fail(f"--target-color must be three numbers in [0, 1] as R,G,B, got {cfg.target_color!r}")


def check_algorithm(cfg):
    """The algorithm's settings: only where they mean something."""
    if cfg.kl_coef > 0 and (cfg.algo.startswith("rwr") or cfg.algo == "awm"):
        fail(
            "--kl-coef works with ddpo-is, ddpo-sf and pxpo, whose updates score the sampled "
            f"steps, and nft (its code's distance to the base); {cfg.algo} has no such term"
        )
    if cfg.algo == "nft" and (cfg.shared_noise or cfg.train_window):  # it samples with the ODE
        flag = "--shared-noise" if cfg.shared_noise else "--train-window"
        fail(f"{flag} does not apply to --algo nft: its sampler is deterministic (no step's noise)")
    if cfg.algo in ON_POLICY and (cfg.updates_per_epoch > 1 or cfg.inner_epochs > 1):
        fail(
            f"--algo {cfg.algo} is on-policy: one update per epoch (--updates-per-epoch 1, "
            "--inner-epochs 1); for several updates on the same samples use --algo ddpo-is, "
            "whose clipped ratio allows them"
        )
    if cfg.pxpo_normalise != "prompt" and cfg.algo != "pxpo":
        fail(f"--pxpo-normalise {cfg.pxpo_normalise} applies to --algo pxpo only, not {cfg.algo}")
    if cfg.min_count > cfg.buffer_size:
        fail(
            f"--min-count ({cfg.min_count}) must be at most --buffer-size ({cfg.buffer_size}), or "
            "no prompt would use its own statistics"
        )


def check_system(cfg):
    """The device, the precision and the tracker: ones this machine can have."""
    # its form; whether torch can use it, once torch has loaded (parallel.setup)
    if not DEVICE.fullmatch(cfg.device):
        fail(
            f"--device {cfg.device}: not a torch device; use cpu, or cuda, mps or xpu, with :N "
            "for the N-th device (e.g. cuda:1)"
        )
    if cfg.mixed_precision == "fp16" and not cfg.device.startswith("cuda"):
        fail("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    if cfg.log_with != "none" and importlib.util.find_spec(cfg.log_with) is None:
        fail(
            f"--log-with {cfg.log_with}: the package {cfg.log_with} is not installed; pip install "
            f"{cfg.log_with}, or leave the flag out"
        )


def check_built_in_rewards(cfg, specs):
    """What the built-in rewards among specs declare (reward_specs.REWARDS): their models' folders
    readable, their prompts ones they can read. The prompt files are read now: a missing or broken
    one fails before the models load."""
    chosen = {spec: REWARDS[spec] for spec in specs if spec in REWARDS}
    for reward in chosen.values():
        for name, kind in reward.models.items():
            check_model(f"--{name.replace('_', '-')}", getattr(cfg, name), kind, "config.json")
    for flag, name in (
        ("--prompts", cfg.prompts),
        ("--eval-prompts", cfg.eval_prompts or cfg.prompts),
    ):
        prompts = load_prompts(name, flag)
        for spec, reward in chosen.items():
            problem = reward.prompts and imported(reward.prompts)(prompts)
            if problem:
                fail(f"--reward {spec} with {flag} {name}: {problem}")


def check_successors(cfg, world):
    """The successors' options (successors.py): groups that fit, and only where they mean "
    "something."""
    k = cfg.samples_per_prompt
    if (cfg.samples_per_epoch // world) % k:
        fail(
            f"--samples-per-epoch ({cfg.samples_per_epoch}) must be a multiple of processes x "
            f"--samples-per-prompt ({world} x {k}): each process samples whole groups"
        )
    for flag, wanted in (
        ("--advantages group", cfg.advantages == "group"),
        ("--shared-noise", cfg.shared_noise),
    ):
        if wanted and k < 2:
            fail(f"{flag} needs groups: --samples-per-prompt 2 or more (4 to 8 is usual), got {k}")
    if not 0 <= cfg.train_window <= cfg.num_steps:
        fail(
            f"--train-window must be in [0, --num-steps {cfg.num_steps}] (0: every step "
            f"stochastic and trained), got {cfg.train_window}"
        )
    if cfg.algo.startswith("rwr") and (cfg.advantages == "group" or cfg.train_window):
        fail(
            "--advantages group and --train-window work with ddpo-is, ddpo-sf and pxpo, which "
            f"train on the steps' log-probs; {cfg.algo} weights per prompt with "
            "--per-prompt-stat-tracking, where each group of --samples-per-prompt is its "
            "prompt's samples"
        )


def check_model(flag, name, kind, index):
    """A model flag names a local folder with its index file (a JSON object), or a hub id "
    "owner/name."""
    path = Path(name)
    if not path.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            fail(
                f"{flag} {name}: no such folder, nor a hub id of the form owner/name; give {kind} "
                "saved by save_pretrained, or a hub id"
            )
        return
    try:
        saved = json.loads((path / index).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(
            f"{flag} {name}: its {index} is missing or unreadable ({type(error).__name__}); give "
            f"{kind} saved by save_pretrained, or a hub id"
        )
    if not isinstance(saved, dict):
        fail(
            f"{flag} {name}: its {index} is not a JSON object; give {kind} saved by "
            "save_pretrained, or a hub id"
        )


def check_terms(terms):
    """--rewards: each term SPEC=WEIGHT, a weight that is a finite number, a SPEC --reward takes."""
    for term in terms:
        spec, weight = split_term(term)
        if weight is None or not math.isfinite(weight):
            fail(
                f"--rewards {term}: give SPEC=WEIGHT, the weight a number and always given (e.g. "
                f"{spec.partition('=')[0]}=1)"
            )
        check_reward(spec, flag=f"--rewards {term}")


def check_reward(spec, flag=None):
    """--reward is a built-in name, or your own function as FILE.py:NAME (the file there) or
    module:NAME (the module importable); whether NAME is in it is known once it is loaded
    (reward_loading.own_reward). flag: how to name it in a refusal (--reward SPEC)."""
    flag = flag or f"--reward {spec}"
    if spec in REWARDS or spec.startswith(
        PYTHON
    ):  # python:...: given to train.main, which checks it
        return
    if is_url(spec):  # served: whether something answers is asked once it is loaded
        parts = urllib.parse.urlsplit(spec)
        try:
            parts.port
        except ValueError:
            fail(f"{flag}: its port is not a number from 0 to 65535; give http://HOST:PORT/PATH")
        if not parts.hostname:
            fail(f"{flag}: no host in it; give http://HOST:PORT/PATH")
        return
    match = OWN_REWARD.fullmatch(spec)
    if not match:
        fail(
            f"{flag}: not a built-in reward ({', '.join(REWARDS)}), nor your own as FILE.py:NAME "
            "or module:NAME, nor a served one as http://HOST:PORT/PATH"
        )
    if match["where"].endswith(".py") and not Path(match["where"]).is_file():
        fail(
            f"{flag}: no file {match['where']}; give FILE.py:NAME, where the file defines "
            "NAME(images, prompts)"
        )
    if not match["where"].endswith(".py") and own_reward_file(spec) is None:
        fail(
            f"{flag}: no module {match['where']} on the Python path; give module:NAME of an "
            "importable module, or FILE.py:NAME"
        )


def check_out(out):
    """--out must be an empty folder, or a path where one can be made."""
    if out.is_dir() and any(path.name != LOCK for path in out.iterdir()):
        fail(
            f"--out {out} is not empty: choose a new folder, or continue that run with --resume "
            f"{out}"
        )
    check_writable(out)


def check_writable(out):
    """--out: a folder, or a path where one can be made, that can be written to."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        fail(f"--out {out}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {out}: {existing} is not writable; choose a folder you can write to")


def read_saved_config(path):
    """A run's config.json as a dict of settings, or one line on what is wrong with it."""
    fix = "restore it from a copy, or start a new run with the same flags"
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(f"--resume: {path} is unreadable ({type(error).__name__}: {error}); {fix}")
    if not isinstance(saved, dict):
        fail(f"--resume: {path} holds no settings (a JSON object); {fix}")
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for key, value in saved.items():
        if key not in types:
            fail(f"--resume: {path} has an unknown setting {key!r}; {fix}")
        wanted = (int, float) if types[key] is float else types[key]
        if value is not None and (
            not isinstance(value, wanted) or (isinstance(value, bool) and types[key] is not bool)
        ):
            fail(
                f"--resume: {path} sets {key} to {value!r}, which is not of type "
                f"{types[key].__name__}; {fix}"
            )
    return saved


def check_own_rewards(folder, saved, accept_changed):
    """check_own_reward for each of --rewards' files (saved["rewards_sha256"]: spec -> sha256)."""
    sources = set()
    for spec, sha in dict(saved["rewards_sha256"]).items():
        term = {"reward": spec, "reward_sha256": sha}
        sources.add(check_own_reward(folder, term, accept_changed))
        saved["rewards_sha256"][spec] = term["reward_sha256"]
    return "; ".join(sorted(sources))


def check_own_reward(folder, saved, accept_changed):
    """A resumed run's own reward must be the one it was trained with: the file still there, and
    unchanged, unless the run has no checkpoint yet (it starts again, with the file as it is now) or
    --accept-changed-reward says the change is meant."""
    spec, path = saved["reward"], own_reward_file(saved["reward"])
    if path is None or not path.is_file():
        fail(
            f"--resume {folder}: its reward {spec} is gone (no "
            f"{path or spec.rpartition(':')[0]}); put it back where it was"
        )
    if file_sha256(path) == saved["reward_sha256"]:
        return f"saved in {folder / 'config.json'}"
    trained = any((folder / "checkpoints").glob("epoch_*.pt"))
    if trained and not accept_changed:
        fail(
            f"--resume {folder}: its reward's file {path} has changed since the run began, and "
            "the run was trained with the old one; restore it, or continue with the new one with "
            "--accept-changed-reward"
        )
    saved["reward_sha256"] = file_sha256(path)
    why = (
        "--accept-changed-reward"
        if trained
        else "changed, but the run has no checkpoint: it starts again"
    )
    return f"derived: the reward's file as it is now ({why})"

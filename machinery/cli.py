"""train.py's command line: the flags (one a setting of config.Config), the settings of a new run in
layers (the paper's defaults, a preset, the algorithm's own, the tuned ones, the flags given), the
saved settings of a resumed one, and --show-config. Like config.py it imports neither torch nor
diffusers, so that --help, --show-config and a bad flag answer at once.
"""

import argparse
import dataclasses
import sys
import time
import uuid
from pathlib import Path

from machinery import checks, families
from machinery.config import (
    ALGO_SETTINGS,
    BUNDLED_PRESETS,
    BUNDLED_MODEL,
    EVAL_PROMPTS_COPY,
    GROUPS,
    PRESETS,
    PROMPTS_COPY,
    RUN,
    SD14,
    TUNED,
    Config,
)
from machinery.devices import cuda_available
from machinery.errors import fail
from machinery.reward_specs import (
    combined_name,
    file_sha256,
    own_reward_file,
    short_reward_name,
    split_term,
)


# Where the defaults come from, for --show-config: the paper's text (arXiv 2305.13301, ICLR 2024
# version) or the original code (jannerm/ddpo) where the paper is silent. The rest are this
# project's.
PAPER_DEFAULTS = {
    "num_steps": "paper, appendix D.5",
    "guidance_scale": "paper, appendix D.5",
    "eta": "original code (jannerm/ddpo: 1.0)",
    "algo": "paper, section 4.3",
    "samples_per_epoch": "paper, appendix D.1",
    "updates_per_epoch": "paper, appendix D.1",
    "clip_range": "paper, appendix D.1",
    "per_prompt_stat_tracking": "paper, appendix D.3",
    "buffer_size": "original code (jannerm/ddpo: 32)",
    "min_count": "original code (jannerm/ddpo: 16)",
    "beta": "paper, appendix D.5",
    "weight_decay": "paper, appendix D.5",
    "max_grad_norm": "paper, appendix D.5",
    "lora_rank": "public PyTorch port (kvablack/ddpo-pytorch)",
    "adv_clip_max": "public PyTorch port",
    "timestep_fraction": "paper: every step trained",
    "inner_epochs": "paper, appendix D.1: one pass",
}


def parse_args(argv=None, description=None):
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.error = fail  # one line, exit status 2
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        if not meta.pop("flag", True):
            continue
        meta["help"] += "" if f.default is None else f" (default: {f.default})"
        if f.type is bool:
            meta["action"] = argparse.BooleanOptionalAction
        else:
            meta.setdefault("type", f.type)
        flag = "--" + f.name.replace("_", "-")
        groups[meta.pop("group")].add_argument(flag, default=argparse.SUPPRESS, **meta)
    own = groups[RUN]  # the two flags of train.py's own go with the run's
    own.add_argument(
        "--show-config",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print every setting the run would use and where it comes from, then exit without "
        "loading a model",
    )
    own.add_argument(
        "--accept-changed-reward",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with --resume: continue although your reward's file has changed since the run began "
        "(you mean the change)",
    )
    own.add_argument(
        "--preflight",
        action="store_true",
        default=argparse.SUPPRESS,
        help="check the model, reward and settings on one batch in about a minute, write nothing, "
        "then exit (docs/reward-not-rising.md)",
    )
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    show, preflight = given.pop("show_config", False), given.pop("preflight", False)
    if preflight and "resume" in given:
        fail("--preflight checks a new run's settings: give its flags, not --resume")
    if "accept_changed_reward" in given and "resume" not in given:
        fail("--accept-changed-reward goes with --resume only")
    cfg, sources = resumed_config(given) if "resume" in given else resolve(given)
    if show:
        print(describe(cfg, sources))
        sys.exit(0)
    if preflight:  # beyond the paper: machinery/preflight.py, which loads torch and the model
        from machinery import preflight

        sys.exit(preflight.run(cfg))
    return cfg


def resolve(given):
    """The settings of a new run, in layers, each over the one before: the paper's defaults
    (Config), the preset, the algorithm's own (ALGO_SETTINGS), the model family's
    (families.SETTINGS), the preset's tuned ones (TUNED), the flags given; then the values derived.
    Returns the Config and where each value came from."""
    model, preset = given.pop("model", "auto"), given.pop("preset", "auto")
    sources = {
        f.name: f"default: {PAPER_DEFAULTS[f.name]}" if f.name in PAPER_DEFAULTS else "default"
        for f in dataclasses.fields(Config)
    }
    sources.update(model="flag", preset="flag")
    if model == "auto":
        cuda = cuda_available()
        model = SD14 if cuda else str(BUNDLED_MODEL)
        why = (
            f"CUDA is available, so {SD14}"
            if cuda
            else "no CUDA device, so the bundled CPU model toy_world/tiny-shapes"
        )
        print(f"--model auto: {why} (choose with --model)")
        sources["model"] = "auto: " + ("CUDA is available" if cuda else "no CUDA device")
    if preset == "auto":
        bundled = {path.resolve(): name for path, name in BUNDLED_PRESETS.items()}
        preset = bundled.get(Path(model).resolve(), "paper")
        sources["preset"] = (
            f"auto: {'a bundled model' if preset != 'paper' else 'not a bundled model'}"
        )
    algo, reward = given.get("algo", Config.algo), given.get("reward", Config.reward)
    layers = [
        (f"preset {preset}", PRESETS[preset]),
        (f"algorithm {algo}", ALGO_SETTINGS[algo]),
        # over the algorithm's: a model's own (FLUX dev's guidance is an input, not nft's CFG)
        ("the model family's (machinery/families)", families.settings(model)),
        (
            f"tuned for {reward} and {algo} (config.TUNED)",
            TUNED.get(preset, {}).get((reward, algo), {}),
        ),
        ("flag", given),
    ]
    settings = {}
    for source, layer in layers:
        settings.update(layer)
        sources.update(dict.fromkeys(layer, source))
    cfg = Config(**{**settings, "model": model, "preset": preset})
    if cfg.rewards and "reward" in given:  # --rewards instead of --reward
        fail("--reward and --rewards: give one (--rewards jpeg=1 takes a single reward too)")
    derive(cfg, sources)
    checks.validate(cfg)  # --rewards' terms too: the sum's name is made from them after
    record_rewards(cfg, sources)
    return cfg, sources


def derive(cfg, sources):
    """The values derived from the others, computed once: the learning rate, the device, the run
    folder and the run's id."""
    if cfg.lr is None:
        cfg.lr = 3e-4 if cfg.lora_rank > 0 else 1e-5
        sources["lr"] = "derived: " + (
            "3e-4 with a LoRA (the PyTorch port)"
            if cfg.lora_rank > 0
            else "1e-5 for the whole UNet (paper, appendix D.5)"
        )
    sample_batch_size(cfg, sources)
    if not cfg.device:
        cfg.device = "cuda" if cuda_available() else "cpu"
        sources["device"] = "derived: cuda when available, else cpu"
    if not cfg.out:
        names = [short_reward_name(split_term(t)[0]) for t in cfg.rewards or [cfg.reward]]
        cfg.out = f"runs/{'+'.join(names)[:48]}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
        sources["out"] = "derived: runs/<reward>-<algo>-<time>"
    cfg.run_id, sources["run_id"] = uuid.uuid4().hex[:12], "derived: new for each run"


def sample_batch_size(cfg, sources):
    """--sample-batch-size, when not given (nor saved): --batch-size."""
    if cfg.sample_batch_size is None:
        cfg.sample_batch_size, sources["sample_batch_size"] = (
            cfg.batch_size,
            "derived: --batch-size",
        )


def record_rewards(cfg, sources):
    """The reward as config.json records it: --rewards' sum named for its terms (the sum's name
    stands for the reward), and each file's sha256 as it is now (--resume checks it is the same)."""
    if cfg.rewards:
        cfg.reward, sources["reward"] = combined_name(cfg.rewards), "derived: --rewards"
        terms = [(term.rpartition("=")[2], *recorded(split_term(term)[0])) for term in cfg.rewards]
        cfg.rewards = [f"{spec}={weight}" for weight, spec, _ in terms]
        cfg.rewards_sha256 = {spec: sha for _, spec, sha in terms if sha}
        sources["rewards_sha256"] = "derived: the terms' files as they are now"
    else:
        cfg.reward, cfg.reward_sha256 = recorded(cfg.reward)
        if cfg.reward_sha256:
            sources["reward_sha256"] = "derived: the reward's file as it is now"


def recorded(spec):
    """A reward as config.json records it: your own FILE.py:NAME with the file's absolute path, and
    the sha256 of your own reward's file (None for any other reward, whose spec stays as it is)."""
    path = own_reward_file(spec)
    if path is None:
        return spec, None
    where, _, name = spec.rpartition(":")
    spec = f"{Path(where).resolve() if where.endswith('.py') else where}:{name}"
    return spec, file_sha256(path)


def describe(cfg, sources):
    """Every setting, its value and where it came from, one a line."""
    width = max(len(name) for name in sources) + 2
    flags = {f.name for f in dataclasses.fields(Config) if f.metadata.get("flag", True)}
    return "\n".join(
        f"{'--' if name in flags else '  '}{name.replace('_', '-'):{width}} "
        f"{getattr(cfg, name)!s:32} {sources[name]}"
        for name in sources
    )


def resumed_config(given):
    """The saved settings of the run to resume; only --epochs may change (to run it further). Its
    prompts are the copies taken at its start (run_folder.write_config). A run that never reached
    its first checkpoint has them too, and starts again from epoch 0."""
    folder, accept_changed = Path(given.pop("resume")), given.pop("accept_changed_reward", False)
    others = sorted(set(given) - {"epochs"})
    if others:
        fail(
            "--resume continues a run with its saved settings: only --epochs may go with it, not "
            f"--{others[0].replace('_', '-')}"
        )
    if not (folder / "config.json").is_file():
        if not any((folder / "checkpoints").glob("epoch_*.pt")):
            fail(
                f"--resume {folder}: no run there (no config.json, no checkpoints/epoch_N.pt); "
                "give the folder of a run train.py started"
            )
        fail(
            f"--resume: {folder / 'config.json'} is missing, so the run's settings are unknown; "
            "restore it from a copy, or start a new run with the same flags"
        )
    saved = checks.read_saved_config(folder / "config.json")
    sources = {
        f.name: f"saved in {folder / 'config.json'}"
        if f.name in saved
        else "default (not in the saved config.json)"
        for f in dataclasses.fields(Config)
    }
    if saved.get("reward_sha256"):
        sources["reward_sha256"] = checks.check_own_reward(folder, saved, accept_changed)
    if saved.get("rewards_sha256"):
        sources["rewards_sha256"] = checks.check_own_rewards(folder, saved, accept_changed)
    for name, copy in (
        ("prompts", folder / PROMPTS_COPY),
        ("eval_prompts", folder / EVAL_PROMPTS_COPY),
    ):
        if (
            saved.get(name) and copy.is_file()
        ):  # runs of earlier versions have no copies: their prompts are read where they were
            saved[name], sources[name] = (
                str(copy),
                f"the copy of {saved[name]} taken at the run's start",
            )
    cfg = Config(**{**saved, **given, "out": str(folder), "resume": str(folder)})
    sample_batch_size(cfg, sources)  # runs of earlier versions sampled at --batch-size
    checks.validate(cfg)
    sources.update(dict.fromkeys([*given, "resume", "out"], "flag"))
    return cfg, sources

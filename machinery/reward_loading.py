"""Your own reward, and the built-in ones, as train.py loads them (--reward): a function given to
train.main, a file or module of yours, the learned rewards' models, the pixel rewards' target. Your
own function is checked at every call: a wrong return ends the run in one line. Not the paper: its
rewards are in rewards.py.
"""

import dataclasses
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModelWithProjection,
)

from machinery.errors import fail, stop
from machinery.own_reward import as_ours, own_reward
from machinery.hub import pretrained
from machinery.served import ServedReward, Unavailable, probe
from machinery.reward_specs import (
    PYTHON,
    REWARDS,
    function,
    is_url,
    short_reward_name,
    split_term,
)
from rewards import aesthetic, alignment


def python_reward(cfg, reward_fn):
    """The Config with reward_fn, a function given to main, named in it as "
    "python:module.qualname."""
    name = None if reward_fn is None else f"{PYTHON}{reward_fn.__module__}.{reward_fn.__qualname__}"
    if cfg.resume and cfg.reward.startswith(PYTHON) and name != cfg.reward:
        fail(
            f"--resume {cfg.out}: the run's reward is the function {cfg.reward[len(PYTHON) :]} "
            "given to train.main; resume it from Python with train.main(['--resume', "
            f"{cfg.out!r}], reward_fn={cfg.reward.rpartition('.')[2]})"
            + (f", not {name[len(PYTHON) :]}" if name else "")
        )
    if name is not None and cfg.resume and not cfg.reward.startswith(PYTHON):
        fail(
            f"--resume {cfg.out}: the run's reward is {cfg.reward}, not a function given to "
            "train.main; resume it without reward_fn"
        )
    return cfg if name is None else dataclasses.replace(cfg, reward=name)


def load_reward(cfg, reward_fn=None, flag=None):
    """The run's reward function (train.py's --reward). The learned ones load their models here,
    once, for this run (and go with it); one that cannot load stops the run before it writes
    anything. Your own (reward_fn, or FILE.py:NAME or module:NAME) and a served one (a URL) are
    checked at every call (checked); flag names it in a refusal (default: --reward SPEC)."""
    if cfg.reward.startswith(PYTHON) and reward_fn is None:
        fail(
            f"--reward {cfg.reward}: names a function given to train.main(reward_fn=...); on the "
            "command line give FILE.py:NAME or module:NAME"
        )
    if cfg.rewards:
        if reward_fn is not None:
            fail(
                "--rewards and a reward_fn given to train.main: give one (a file term is "
                "FILE.py:NAME=W)"
            )
        return combined(cfg)
    if is_url(cfg.reward):
        return checked(served_reward(cfg), cfg.reward, cfg.out, flag)
    if cfg.reward not in REWARDS:
        return checked(as_ours(reward_fn or own_reward(cfg.reward)), cfg.reward, cfg.out, flag)
    return built_in(cfg) if flag is None else checked(built_in(cfg), cfg.reward, cfg.out, flag)


def combined(cfg):
    """--rewards: the weighted sum of its terms, each loaded as --reward loads it and checked at
    every call (a term that fails names itself). A map term (B, H, W) makes the sum a map, the
    scalar terms spread over it. The function's `terms` holds each term's raw scores of its last
    call, named by the term's short name (Run logs their means); `raw` sums the unchecked terms
    (the preflight's)."""
    terms = []
    for term in cfg.rewards:
        spec, weight = split_term(term)
        flag = f"--rewards {term}"
        fn = load_reward(dataclasses.replace(cfg, reward=spec, rewards=None), flag=flag)
        terms.append((unique(short_reward_name(spec), [name for name, _, _ in terms]), weight, fn))

    def weighted(scores, images, prompts):
        maps = [s for s in scores.values() if s.dim() == 3]
        shape = maps[0].shape if maps else (len(prompts),)
        total = torch.zeros(shape, device=images.device)
        for name, weight, _ in terms:
            value = scores[name].to(images.device)
            total = total + weight * (value if value.dim() == len(shape) else value.view(-1, 1, 1))
        return total

    def reward(images, prompts, check=False):
        reward.terms = {name: fn(images, prompts, check=check) for name, _, fn in terms}
        return weighted(reward.terms, images, prompts)

    def raw(images, prompts):
        size = images.shape[-2:]
        scores = {
            name: as_scores(fn.raw(images, prompts), len(prompts), size) for name, _, fn in terms
        }
        return weighted(scores, images, prompts)

    reward.terms, reward.raw = {}, raw
    served = [fn for _, _, fn in terms if hasattr(fn, "submit")]
    if served:
        reward.submit = lambda images, prompts: [fn.submit(images, prompts) for fn in served]
    return reward


def unique(name, taken):
    """name, or name_2, name_3 ... when it is taken already (two terms of one reward)."""
    return (
        name
        if name not in taken
        else next(f"{name}_{k}" for k in range(2, 99) if f"{name}_{k}" not in taken)
    )


def built_in(cfg):
    """A built-in reward (reward_specs.REWARDS), made as its entry says: a learned one with its
    models loaded (one line if they cannot be), a pixel reward with its target colour."""
    reward = REWARDS[cfg.reward]
    if not reward.options:
        return function(reward)
    try:
        return reward.make(cfg, function(reward), reward.options)
    except OSError as error:
        fail(str(error))


def served_reward(cfg):
    """The reward at the URL of --reward (served.py), once something answers there."""
    problem = probe(cfg.reward, timeout=min(cfg.reward_timeout, 10.0))
    if problem:
        fail(
            f"--reward {cfg.reward}: nothing answers there ({problem}); start the server first, "
            "e.g. python reward_server.py --reward jpeg --port 8000"
        )
    return ServedReward(cfg.reward, cfg.reward_format, cfg.reward_timeout, cfg.reward_retries)


def aesthetic_reward(clip_model, device="cpu", batch_size=32):
    """rewards.aesthetic on the CLIP model of --aesthetic-model (a folder or a hub id)."""
    processor = pretrained(AutoImageProcessor, clip_model, "--aesthetic-model")
    clip = pretrained(CLIPVisionModelWithProjection, clip_model, "--aesthetic-model")
    return aesthetic(clip.to(device).eval(), processor, device=device, batch_size=batch_size)


def alignment_reward(vlm_model, scorer_model, scorer_layer, device="cpu", **sizes):
    """rewards.alignment on the VLM of --alignment-model (in fp16 on CUDA) and the BERT of
    --bertscore-model, whose layer --bertscore-layer must exist. sizes: alignment's batch sizes."""
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    processor = pretrained(AutoProcessor, vlm_model, "--alignment-model", padding_side="left")
    vlm = pretrained(AutoModelForImageTextToText, vlm_model, "--alignment-model", dtype=dtype)
    tokenizer = pretrained(AutoTokenizer, scorer_model, "--bertscore-model")
    scorer = pretrained(AutoModel, scorer_model, "--bertscore-model")
    if not 0 <= scorer_layer <= scorer.config.num_hidden_layers:
        raise OSError(
            f"--bertscore-layer {scorer_layer}: {scorer_model} has layers 0 to "
            f"{scorer.config.num_hidden_layers}; choose one of them"
        )
    vlm, scorer = vlm.to(device).eval(), scorer.to(device).eval()
    return alignment(vlm, processor, tokenizer, scorer, scorer_layer, device, **sizes)


def checked(fn, spec, out, flag=None):
    """fn (as_ours) as train.py calls a reward, its output made a float tensor on the images'
    device, once a call. A return that is not B scores (or a (B, H, W) map), or that carries a
    gradient, ends the run in one line naming the function; so does a non-finite one, on the batch
    it is checked on (check). An exception raised inside fn shows its traceback, then one line on
    what was kept and how to continue; a served reward's server that stays away, one line."""

    def reward(images, prompts, check=False):
        try:
            values = fn(images, prompts)
        except Unavailable as error:
            bad(str(error), error.fix)
        except Exception as error:  # the user's code, raising anything: its frames, then one line
            traceback.print_exc()
            bad(f"raised {type(error).__name__}: {error} (its traceback is above)")
        try:
            values = as_scores(values, len(prompts), images.shape[-2:], finite=check)
        except ValueError as error:
            bad(str(error) + (" on the first batch" if check else ""))
        return values.to(images.device)

    def bad(problem, fix=None):
        if hasattr(fn, "abandon"):  # a served reward: nothing more is sent, nothing waited for
            fn.abandon()
        saved = sorted((Path(out) / "checkpoints").glob("epoch_*.pt"))
        trained = bool(saved)  # then the fixed file is a changed one, said so knowingly
        resume = f"python train.py --resume {out}{' --accept-changed-reward' if trained else ''}"
        if spec.startswith(PYTHON):
            resume = f"train.main(['--resume', {str(out)!r}], reward_fn={spec.rpartition('.')[2]})"
        kept = f"the checkpoint {saved[-1].name} is kept" if saved else "no epoch had finished"
        fix = fix or (
            "fix the reward on the server, then" if is_url(spec) else "fix the function, then"
        )
        stop(
            f"{flag or f'--reward {spec}'}: {problem}; nothing of this epoch was trained on or "
            f"saved ({kept}): {fix} continue with: {resume}"
        )

    if hasattr(fn, "submit"):  # a served reward: each batch posted as soon as it is sampled
        reward.submit = fn.submit
    reward.raw = fn  # unchecked, for the preflight's own report
    return reward


def as_scores(values, batch, size, finite=False):
    """A reward's return -> a float32 tensor of batch scores or (batch, H, W) maps (size: (H, W)),
    or ValueError on what it returned instead; with finite, non-finite values are one too."""
    height, width = size
    if values is None:
        raise ValueError("returned None (no return statement?), not the batch's scores")
    try:
        values = (
            values
            if isinstance(values, torch.Tensor)
            else torch.as_tensor(np.asarray(values, dtype=np.float32))
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"returned {type(values).__name__}, not numbers ({error})") from None
    if values.requires_grad:
        raise ValueError(
            "returned a tensor that requires grad; return it detached (scores.detach()): a reward "
            "is data to the policy, not part of its graph"
        )
    if tuple(values.shape) not in ((batch,), (batch, height, width)):
        raise ValueError(
            f"returned shape {tuple(values.shape)} for {batch} images; return {batch} scores, or "
            f"a ({batch}, {height}, {width}) map for a pixel-wise reward"
        )
    if finite and not torch.isfinite(values).all():
        raise ValueError(f"returned non-finite values ({values.flatten()[:4].tolist()} ...)")
    return values.float()

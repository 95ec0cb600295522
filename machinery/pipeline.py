"""A pipeline of a model family (machinery/families/) for DDPO: loading it, the trainable LoRA,
compiling, and saving the trained weights. The libraries' workarounds live here, so that
sampler.py is the policy's maths.
"""

import logging
from pathlib import Path

import torch

# diffusers' pipeline module looks up transformers' CLIP and SigLIP image processors; without
# torchvision they fall back to their PIL versions (which this project uses) with a notice each.
# Only those two notices are dropped, where they are logged, before diffusers' pipelines are
# imported.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from machinery.config import SD14, Config  # noqa: E402
from machinery.errors import fail  # noqa: E402
from machinery.families import FAMILIES, family  # noqa: E402
from machinery.hub import hub_reachable  # noqa: E402

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision


def autocast(device, mixed_precision):
    """The forwards' autocast to --mixed-precision's dtype; off at "no"."""
    return torch.autocast(
        device.type, dtype=DTYPES[mixed_precision], enabled=mixed_precision != "no"
    )


def pipeline_class(model, local_files_only=False):
    """The pipeline class a hub id or a local folder names in its model_index.json."""
    return DiffusionPipeline.load_config(model, local_files_only=local_files_only).get(
        "_class_name"
    )


def load_pipeline(
    model, device="cpu", dtype=torch.float32, local_files_only=False, noise_level=Config.noise_level
):
    """A pipeline of a family of machinery/families/ from a hub id or a local folder, for DDPO:
    loaded by its family, which makes its scheduler the policy's (a flow model's at
    noise_level) and turns off what a reward could learn to exploit (the safety checker, SDXL's
    watermark). pipe.family is that module. Every weight starts frozen: the trainer decides what
    to unfreeze (a LoRA or the whole denoiser)."""
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # loading takes seconds; its bars would only clutter the log
    kind = family(pipeline_class(model, local_files_only))
    pipe = kind.load(model, dtype, local_files_only, noise_level)
    pipe.family = kind
    encoders = [getattr(pipe, f"text_encoder{n}", None) for n in ("", "_2", "_3")]
    for module in (pipe.vae, *encoders, pipe.unet):
        if module is not None:
            module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_model(cfg, device, dtype):
    """The pipeline of --model, or one line on why it cannot be loaded or cannot take --num-steps "
    "or --lora-rank."""
    local_files_only = (
        not hub_reachable()
    )  # one probe of the network (up to its timeout without one)
    try:
        kind = pipeline_class(cfg.model, local_files_only)
        if kind not in FAMILIES:
            fail(
                f"--model {cfg.model} is a {kind}; train.py trains {', '.join(FAMILIES)} "
                f"models (machinery/families/), so pass one of those (e.g. {SD14})"
            )
        pipe = load_pipeline(cfg.model, device, dtype, local_files_only, cfg.noise_level)
    except OSError as error:
        if Path(cfg.model).is_dir():
            fail(
                f"--model {cfg.model}: not a readable diffusers pipeline folder "
                f"({type(error).__name__}); pass a folder saved by save_pretrained "
                "(model_index.json and its parts), or a hub id"
            )
        fail(
            f"--model {cfg.model}: cannot load it ({type(error).__name__}: no network, not in the "
            f"hub cache, or no such model); download it first with `hf download {cfg.model}`, or "
            "pass a local folder"
        )
    pipe.family.check_steps(cfg, pipe.scheduler)
    projections = [
        m
        for name, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(pipe.family.LORA_TARGETS))
    ]
    full_rank = max(min(m.in_features, m.out_features) for m in projections)
    if cfg.lora_rank > full_rank:
        size = sum(cfg.lora_rank * (m.in_features + m.out_features) * 4 for m in projections)
        fail(
            f"--lora-rank {cfg.lora_rank}: above the full rank of every projection the LoRA "
            f"adapts on {cfg.model} (at most {full_rank}), so it adds only size "
            f"({size / 2**20:.0f} MB of LoRA weights, saved every epoch); use at most "
            f"{full_rank}, or 0 for the whole denoiser"
        )
    return pipe


def add_trainable(pipe, lora_rank):
    """A LoRA on the denoiser's attention projections (its family's LORA_TARGETS, kept in fp32), or
    the whole denoiser when rank is 0. Returns the trainable parameters."""
    unet = pipe.unet
    if lora_rank == 0:
        unet.to(torch.float32).requires_grad_(True)
    else:
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=pipe.family.LORA_TARGETS,
            )
        )
        cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def compile_policy(pipe, base=None):
    """torch.compile the policy's UNet in place (its weights and state_dict stay as they are), and
    the base policy's when that is a frozen copy. Each kind of call compiles once, on first use:
    sampling (no gradient), training (forward and backward) and the base policy (adapter off)."""
    pipe.unet.compile()
    if base is not None:
        with base() as base_unet:
            if base_unet is not pipe.unet:
                base_unet.compile()


def save_weights(pipe, folder, lora_rank):
    """The trained weights into folder: the LoRA in diffusers' format (for load_lora_weights), or
    the whole UNet after a full fine-tune (epoch_log.export_weights puts them in place)."""
    if lora_rank == 0:
        pipe.unet.save_pretrained(folder)
    else:
        pipe.family.save_lora(pipe, folder, get_peft_model_state_dict(pipe.unet))


def prompt_losses(tokenizer, prompt_sets):
    """What the text encoder will not see of each set of prompts (by its flag), as lines to warn
    with: the tokens past its length, which it cuts, and characters its vocabulary lacks, read as
    its unknown token."""
    notices = []
    for flag, prompts in prompt_sets.items():
        distinct = sorted(set(prompts))
        ids = [
            tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
            for prompt in distinct
        ]
        room = tokenizer.model_max_length - 2  # the start and end tokens take two places
        cut = [len(tokens) - room for tokens in ids if len(tokens) > room]
        unknown = [
            prompt for prompt, tokens in zip(distinct, ids) if tokenizer.unk_token_id in tokens
        ]
        if cut:
            notices.append(
                f"{flag}: {len(cut)} of {len(distinct)} prompts are longer than the text "
                f"encoder's {room} tokens and are cut ({sum(cut)} tokens dropped, up to "
                f"{max(cut)} of one prompt)"
            )
        if unknown:
            notices.append(
                f"{flag}: {len(unknown)} of {len(distinct)} prompts have characters the tokenizer "
                f"does not know, which it reads as its unknown token (e.g. {unknown[0]!r})"
            )
    return notices

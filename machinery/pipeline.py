"""Stable Diffusion 1.x, 2.x, XL and 3 for DDPO: loading a pipeline, the trainable LoRA, compiling, and saving the
trained weights. The libraries' workarounds live here, so that sampler.py is the policy's maths.
"""

import logging
from pathlib import Path

import torch

# diffusers' pipeline module looks up transformers' CLIP and SigLIP image processors; without
# torchvision they fall back to their PIL versions (which this project uses) with a notice each.
# Only those two notices are dropped, where they are logged, before diffusers' pipelines are imported.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)

from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from machinery import flow  # noqa: E402
from machinery.config import SD14, Config, fail  # noqa: E402
from machinery.hub import hub_reachable  # noqa: E402
from sampler import PREDICTION_TYPES, ddim_mean_std  # noqa: E402

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": flow.FlowPipeline,
}  # by model_index.json's name
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
    model, device="cpu", dtype=torch.float32, local_files_only=False, noise_level=flow.NOISE_LEVEL
):
    """A Stable Diffusion 1.x, 2.x, XL or 3 pipeline from a hub id or a local folder, for DDPO.

    The safety checker is off (it blacks out images, which a reward would learn to exploit; SDXL's
    invisible watermark likewise), the scheduler is DDIM with the model's own noise schedule and
    prediction type (SD3: its flow-matching scheduler, shift and all, taking Flow-GRPO's SDE steps
    at noise_level, machinery/flow.py), SDXL's VAE decodes in fp32 (it overflows in fp16), and every
    weight starts frozen: the trainer decides what to unfreeze (a LoRA or the whole denoiser).
    """
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # loading takes seconds; its bars would only clutter the log
    kind = PIPELINES[pipeline_class(model, local_files_only)]
    off = {
        StableDiffusionXLPipeline: dict(add_watermarker=False),
        flow.FlowPipeline: {},
    }.get(kind, dict(safety_checker=None, requires_safety_checker=False))
    pipe = kind.from_pretrained(model, dtype=dtype, local_files_only=local_files_only, **off)
    if kind is flow.FlowPipeline:
        pipe.scheduler = flow.FlowSDEScheduler.from_config(pipe.scheduler.config)
        pipe.scheduler.noise_level = noise_level
        pipe.scheduler.register_to_config(prediction_type="v_prediction")  # the flow's velocity
        patches = pipe.unet.config.sample_size // pipe.unet.config.patch_size
        pipe.scheduler.image_seq_len = patches**2
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    encoders = [getattr(pipe, f"text_encoder{n}", None) for n in ("", "_2", "_3")]
    for module in (pipe.vae, *encoders, pipe.unet):
        if module is not None:
            module.requires_grad_(False)
    if kind is StableDiffusionXLPipeline and pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_model(cfg, device, dtype):
    """The pipeline of --model, or one line on why it cannot be loaded or cannot take --num-steps or --lora-rank."""
    local_files_only = (
        not hub_reachable()
    )  # one probe of the network (up to its timeout without one)
    try:
        kind = pipeline_class(cfg.model, local_files_only)
        if kind not in PIPELINES:
            fail(
                f"--model {cfg.model} is a {kind}; train.py trains {' and '.join(PIPELINES)} models (SD 1.x and 2.x, SDXL, SD3), "
                f"so pass one of those (e.g. {SD14})"
            )
        pipe = load_pipeline(cfg.model, device, dtype, local_files_only, cfg.noise_level)
    except OSError as error:
        if Path(cfg.model).is_dir():
            fail(
                f"--model {cfg.model}: not a readable diffusers pipeline folder ({type(error).__name__}); pass a folder saved by "
                f"save_pretrained (model_index.json and its parts), or a hub id"
            )
        fail(
            f"--model {cfg.model}: cannot load it ({type(error).__name__}: no network, not in the hub cache, or no such model); "
            f"download it first with `hf download {cfg.model}`, or pass a local folder"
        )
    (check_flow_steps if flow.is_flow(pipe.scheduler) else check_ddim_steps)(cfg, pipe.scheduler)
    projections = [
        m
        for name, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(lora_targets(pipe.unet)))
    ]
    full_rank = max(min(m.in_features, m.out_features) for m in projections)
    if cfg.lora_rank > full_rank:
        size = sum(cfg.lora_rank * (m.in_features + m.out_features) * 4 for m in projections)
        fail(
            f"--lora-rank {cfg.lora_rank}: above the full rank of every projection the LoRA adapts on {cfg.model} (at most {full_rank}), "
            f"so it adds only size ({size / 2**20:.0f} MB of LoRA weights, saved every epoch); use at most {full_rank}, or 0 for the whole denoiser"
        )
    return pipe


def check_ddim_steps(cfg, scheduler):
    """One line on why the model's DDIM steps cannot be the policy: a prediction the Gaussian is not
    written for, or a step that adds no noise (so has no log-prob) at --num-steps."""
    if cfg.noise_level != Config.noise_level:
        fail(
            f"--noise-level {cfg.noise_level}: a flow model's noise, but {cfg.model} samples with DDIM, whose noise is --eta "
            f"(default {Config.eta})"
        )
    prediction, thresholding = scheduler.config.prediction_type, scheduler.config.thresholding
    if prediction not in PREDICTION_TYPES or thresholding:
        fail(
            f"--model {cfg.model}: its scheduler predicts {prediction!r}{' with thresholding' if thresholding else ''}; the policy's "
            f"Gaussian is written for {' and '.join(PREDICTION_TYPES)} without thresholding (sampler.ddim_mean_std)"
        )
    if (
        prediction == "epsilon" and scheduler.alphas_cumprod[-1] == 0
    ):  # x0_hat = (x_t - eps) / sqrt(abar_T) = (x_t - eps) / 0
        fail(
            f"--model {cfg.model}: its scheduler has zero terminal SNR (rescale_betas_zero_snr) and predicts 'epsilon', from which the "
            f"clean image at t = T cannot be recovered (it divides by sqrt(alpha-bar_T) = 0); such schedules go with "
            f'"prediction_type": "v_prediction" in scheduler/scheduler_config.json'
        )
    for flag, num_steps in (
        ("--num-steps", cfg.num_steps),
        ("--eval-num-steps", cfg.eval_num_steps),
    ):
        scheduler.set_timesteps(
            num_steps or cfg.num_steps
        )  # as sampling will: its steps must fall within the training timesteps
        trained, offset = (
            scheduler.config.num_train_timesteps,
            scheduler.config.get("steps_offset", 0),
        )
        if scheduler.timesteps.max() >= trained:
            fail(
                f"{flag} {num_steps}: {cfg.model}'s scheduler reaches past its {trained} training timesteps (offset {offset}); "
                f"use at most {trained - offset}"
            )
        zero = torch.zeros(1, 1)
        _, std = ddim_mean_std(
            scheduler, zero, scheduler.timesteps, zero.expand(len(scheduler.timesteps), 1), cfg.eta
        )
        if not (
            std > 0
        ).all():  # e.g. timestep_spacing "linspace" ends on t = 0, whose step to the final alpha-bar adds no noise
            fail(
                f"{flag} {num_steps}: with {cfg.model}'s scheduler ({scheduler.config.timestep_spacing} spacing) a step adds no noise "
                f"(sigma_t = 0 at t = {int(scheduler.timesteps[(std.flatten() <= 0).nonzero()[0]])}), so it has no log-prob; "
                f'set timestep_spacing to "leading" or "trailing" in its scheduler/scheduler_config.json'
            )


def check_flow_steps(cfg, scheduler):
    """One line on why a flow model's SDE steps cannot be the policy at --num-steps: a schedule that
    does not run from t = 1 to t = 0, or a step without noise (its std must be finite and > 0)."""
    if cfg.eta != Config.eta:
        fail(
            f"--eta {cfg.eta}: DDIM's noise, but {cfg.model} is a flow model, whose SDE step's noise is --noise-level "
            f"(default {Config.noise_level})"
        )
    for flag, num_steps in (
        ("--num-steps", cfg.num_steps),
        ("--eval-num-steps", cfg.eval_num_steps),
    ):
        scheduler.set_timesteps(num_steps or cfg.num_steps)
        sigmas = scheduler.sigmas
        if scheduler.config.invert_sigmas or sigmas[0] != 1 or sigmas[-1] != 0:
            fail(
                f"--model {cfg.model}: its scheduler's t runs from {float(sigmas[0]):g} to {float(sigmas[-1]):g}; Flow-GRPO's SDE step "
                f"(machinery/flow.py) is written for a flow from t = 1 (noise) to t = 0 (data), as SD3's scheduler ships"
            )
        zero = torch.zeros(len(scheduler.timesteps), 1)
        _, std = flow.sde_mean_std(scheduler, zero, scheduler.timesteps, zero)
        if not (torch.isfinite(std) & (std > 0)).all():
            fail(
                f"{flag} {num_steps}: with {cfg.model}'s scheduler a step's std is {std.flatten().tolist()}, so not every step has a "
                f"log-prob; use more steps, or a --noise-level > 0"
            )


def lora_targets(unet):
    """The projections a LoRA adapts: the UNet's attention's, or SD3's transformer's (both streams)."""
    return flow.LORA_TARGETS if flow.is_transformer(unet) else LORA_TARGETS


def add_trainable(unet, lora_rank):
    """A LoRA on the attention projections (kept in fp32), or the whole denoiser when rank is 0."""
    if lora_rank == 0:
        unet.to(torch.float32).requires_grad_(True)
    else:
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=lora_targets(unet),
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
    """The trained weights into folder: the LoRA in diffusers' format (for load_lora_weights), or the
    whole UNet after a full fine-tune (run_folder.export_weights puts them in place)."""
    if lora_rank == 0:
        pipe.unet.save_pretrained(folder)
    else:
        layers = get_peft_model_state_dict(pipe.unet)
        if flow.is_transformer(pipe.unet):  # PEFT's names, as diffusers' SD3 LoRA scripts save
            type(pipe).save_lora_weights(folder, transformer_lora_layers=layers)
        else:
            layers = convert_state_dict_to_diffusers(layers)
            type(pipe).save_lora_weights(folder, unet_lora_layers=layers)


def prompt_losses(tokenizer, prompt_sets):
    """What the text encoder will not see of each set of prompts (by its flag), as lines to warn with:
    the tokens past its length, which it cuts, and characters its vocabulary lacks, read as its
    unknown token."""
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
                f"{flag}: {len(cut)} of {len(distinct)} prompts are longer than the text encoder's {room} tokens and are cut "
                f"({sum(cut)} tokens dropped, up to {max(cut)} of one prompt)"
            )
        if unknown:
            notices.append(
                f"{flag}: {len(unknown)} of {len(distinct)} prompts have characters the tokenizer does not know, which it "
                f"reads as its unknown token (e.g. {unknown[0]!r})"
            )
    return notices

"""Model families: what each kind of pipeline changes of the policy, one file a family.

A family is a module with the same names: PIPELINE (the diffusers class it loads), POLICY
(sampler.Policy: the conditioning c, the denoiser's prediction, the step's Gaussian, the decoder),
LORA_TARGETS, NOISE (the flag of its step's noise), load(model, dtype, local_files_only,
noise_level), check_steps(cfg, scheduler) and save_lora(pipe, folder, layers). The family is
chosen once, by the pipeline class that the model's model_index.json names
(pipeline.load_pipeline). To add one: a new file here, and its line below (and in SETTINGS, if
its own settings differ from the paper's).
"""

import importlib
import json
import re
from pathlib import Path

from machinery.hub import hub_reachable

FAMILIES = {  # model_index.json's _class_name -> this folder's module
    "StableDiffusionPipeline": "sd",  # SD 1.x (the paper's: sampler.py) and 2.x
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",  # a flow model, with Flow-GRPO's SDE step
    "FluxPipeline": "flux",  # FLUX.1 dev and schnell: the same, guidance an input
}
# A family's settings over the paper's and the algorithm's (under the flags), from the model's own
# files, read before anything loads: read(file) -> that JSON file of the model as a dict.
SETTINGS = {  # FluxPipeline's guidance: 3.5 where the transformer takes it (dev), 1: none (schnell)
    "FluxPipeline": lambda read: dict(
        guidance_scale=3.5 if read("transformer/config.json").get("guidance_embeds") else 1.0
    ),
}


def model_file(model, name):
    """The JSON file name of a model (a folder or a hub id) as a dict, without loading the model:
    from its folder, the hub cache, or the hub where it answers; {} where none has it."""
    path = Path(model) / name
    if not path.is_file() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        try:  # not a hub id after all (./folder), no such model, the hub refused: the load says
            path = try_to_load_from_cache(model, name)
            if not isinstance(path, str) and hub_reachable():
                path = hf_hub_download(model, name)
        except (OSError, ValueError):
            path = None
    try:
        return json.loads(Path(path).read_text()) if isinstance(path, (str, Path)) else {}
    except (OSError, ValueError):
        return {}


def settings(model):
    """The settings --model's family sets (SETTINGS), as read from its files: {} for most."""
    class_name = model_file(model, "model_index.json").get("_class_name")
    rule = SETTINGS.get(class_name)
    return rule(lambda name: model_file(model, name)) if rule else {}


def schedules(cfg, scheduler):
    """--num-steps and --eval-num-steps (each flag and its value), the scheduler's timesteps set
    for each as sampling will set them: what a family's check_steps checks the policy's steps at."""
    for flag, num_steps in (
        ("--num-steps", cfg.num_steps),
        ("--eval-num-steps", cfg.eval_num_steps),
    ):
        scheduler.set_timesteps(num_steps or cfg.num_steps)
        yield flag, num_steps


def family(class_name):
    """The module of the family whose pipeline is class_name (KeyError: none)."""
    return importlib.import_module(f"{__name__}.{FAMILIES[class_name]}")

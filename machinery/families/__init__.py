"""Model families: what each kind of pipeline changes of the policy, one file a family.

A family is a module with the same names: PIPELINE (the diffusers class it loads), POLICY
(sampler.Policy: the conditioning c, the denoiser's prediction, the step's Gaussian, the decoder),
LORA_TARGETS, NOISE (the flag of its step's noise), load(model, dtype, local_files_only,
noise_level), check_steps(cfg, scheduler) and save_lora(pipe, folder, layers). The family is
chosen once, by the pipeline class that the model's model_index.json names
(pipeline.load_pipeline). To add one: a new file here, and its line below.
"""

import importlib

FAMILIES = {  # model_index.json's _class_name -> this folder's module
    "StableDiffusionPipeline": "sd",  # SD 1.x (the paper's: sampler.py) and 2.x
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",  # a flow model, with Flow-GRPO's SDE step
}


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

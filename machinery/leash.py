"""Beyond the paper: the pretrained policy p_base, and a KL leash to it (DPOK, arXiv 2305.16381;
Flow-GRPO, arXiv 2505.05470). train.update adds kl_term's penalty to its loss; sampling and the
evaluation measure the same KL with sampler.policy_kl.
"""

import contextlib
import copy

import torch

from sampler import guided_eps, policy_kl


def base_policy(unet, lora_rank):
    """The pretrained policy p_base, for the KL leash and the evaluation: a function that returns a
    context holding the base UNet. With a LoRA it is the same UNet with the adapter switched off
    (no copy); after a full fine-tune, a frozen copy made now, before any update."""
    if lora_rank == 0:
        frozen = copy.deepcopy(unet).requires_grad_(False)
        return lambda: contextlib.nullcontext(frozen)

    @contextlib.contextmanager
    def adapter_off():
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    return adapter_off


def kl_term(cfg, pipe, base, traj, states, eps, first, measured):
    """The update's extra loss term and its diagnostics: cfg.kl_coef times KL(p_theta || p_base) at
    these states (x_t, t, c), from the policy's prediction eps and one more guided forward of the
    base policy without gradient. At kl_coef 0 the KL is only measured, on a forward's first
    `measured` states (each sample's first trained step), at the first forward of a minibatch.
    Without a base policy (config.base_needed) there is neither: (0, {})."""
    if base is None or not (cfg.kl_coef > 0 or first):
        return 0, {}
    part = slice(None if cfg.kl_coef > 0 else measured)
    latents, timesteps, prompt_embeds = (s[part] for s in states)
    with torch.no_grad(), base() as base_unet:
        base_eps = guided_eps(
            base_unet,
            latents,
            timesteps,
            prompt_embeds,
            traj["negative_embeds"],
            cfg.guidance_scale,
        )
    kl = policy_kl(
        pipe.scheduler, eps[part], base_eps, timesteps, latents, cfg.eta
    ).mean()  # per element, then states
    return cfg.kl_coef * kl, {"kl_to_base": kl.detach()}

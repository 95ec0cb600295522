"""Beyond the paper: the pretrained policy p_base, and a KL leash to it (DPOK, arXiv 2305.16381;
Flow-GRPO, arXiv 2505.05470). train.update adds kl_penalty's term to its loss; the evaluation
measures the same KL (policy_kl) at every state it samples (KLToBase).
"""

import contextlib
import copy

import torch

from sampler import ddim_mean_std, guided_prediction, reduce_elements


def policy_kl(
    scheduler,
    model_output,
    base_output,
    timestep,
    sample,
    eta=1.0,
    reduce="mean",
    mean_std=ddim_mean_std,
):
    """KL(p_theta(. | s_t) || p_base(. | s_t)), the leash to the pretrained model (not in DDPO:
    DPOK, arXiv 2305.16381, and Flow-GRPO, arXiv 2505.05470, add it), from the two models'
    predictions at the state (c, t, x_t). Both steps are Gaussians with the same sigma_t, so it is
    ||mean_t - base_mean_t||^2 / (2 sigma_t^2), element by element, reduced like the log-prob. The
    base policy is fixed: the gradient flows through model_output only. mean_std: the step's
    Gaussian, DDIM's or a model family's (Policy)."""
    mean, std = mean_std(scheduler, model_output, timestep, sample, eta)
    base_mean, _ = mean_std(scheduler, base_output.detach(), timestep, sample, eta)
    return reduce_elements((mean - base_mean) ** 2 / (2 * std**2), reduce)


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


def kl_penalty(cfg, learner, traj, states, eps, first, measured):
    """The update's extra loss term and its diagnostics: cfg.kl_coef times KL(p_theta || p_base) at
    these states (x_t, t, c), from the policy's prediction eps and one more guided forward of the
    base policy (learner.base) without gradient. At kl_coef 0 the KL is only measured, on a
    forward's first `measured` states (each sample's first trained step), at the epoch's first
    forward (the weights that sampled the epoch, on its first minibatch). Without a base policy
    (config.base_needed) there is neither: (0, {})."""
    base, policy = learner.base, learner.policy
    if base is None or not (cfg.kl_coef > 0 or first):
        return 0, {}
    part = slice(None if cfg.kl_coef > 0 else measured)
    latents, timesteps, prompt_embeds = (s[part] for s in states)
    state = (latents, timesteps, prompt_embeds, traj["negative_embeds"], cfg.guidance_scale)
    with torch.no_grad(), base() as base_unet:
        base_eps = guided_prediction(base_unet, *state, predict=policy.predict)
    scheduler = learner.pipe.scheduler
    kl = policy_kl(
        scheduler, eps[part], base_eps, timesteps, latents, cfg.eta, "mean", policy.mean_std
    ).mean()  # per element, then states
    return cfg.kl_coef * kl, {"kl_to_base": kl.detach()}


class KLToBase:
    """sample_trajectories' on_step: KL(p_theta || p_base) at every state sampled (policy_kl,
    reduced like the log-prob's "mean"), from one more guided forward of the base policy a step,
    without gradient; no noise is drawn. kl() is the (B, T) KLs of the samples so far."""

    def __init__(self, pipe, base, eta, policy):
        self.pipe, self.base, self.eta, self.policy, self.batches = pipe, base, eta, policy, []

    def __call__(self, step, t, state, eps):
        if step == 0:  # a new batch's first state
            self.batches.append([])
        with self.base() as base_unet:
            base_eps = guided_prediction(base_unet, *state, predict=self.policy.predict)
        scheduler, x_t = self.pipe.scheduler, state[0]
        mean_std = self.policy.mean_std
        kl = policy_kl(scheduler, eps, base_eps, t, x_t, self.eta, "mean", mean_std)
        self.batches[-1].append(kl)

    def kl(self):
        return torch.cat([torch.stack(steps, dim=1) for steps in self.batches])

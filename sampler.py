"""The policy: Stable Diffusion's denoiser, sampled with DDIM and read as a Gaussian policy.

Denoising as a Markov decision process (Black et al. 2023, section 4.3 "Denoising Diffusion Policy
Optimization", its paragraph "Denoising as a multi-step MDP"):

    state    s_t = (c, t, x_t)          prompt, timestep, current latent
    action   a_t = x_{t-1}              the next latent
    policy   pi(a_t | s_t) = p_theta(x_{t-1} | x_t, c), one DDIM step with eta > 0 (this file)
    start    c ~ p(c), t = T, x_T ~ N(0, I)
    step     deterministic: (c, t, x_t) -> (c, t - 1, x_{t-1})
    reward   r(x_0, c) after the last step, 0 before it (rewards.py)

With eta > 0 a DDIM step draws x_{t-1} from a diagonal Gaussian whose mean depends on the UNet, so
every step has a log-probability. This file takes that step with its log-prob, and samples whole
trajectories, keeping everything the update (ddpo.py, train.py) needs.
"""

import contextlib
import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from machinery import flow

REDUCTIONS = ("mean", "sum", "none")
# what the UNet predicts: SD 1.x and SDXL the noise, SD 2.x at 768 px the velocity v
PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_mean_std(scheduler, model_output, timestep, sample, eta=1.0):
    """The policy's Gaussian at state (c, t, x_t) (paper, section 4.3): mean_t and sigma_t of the
    DDIM step x_t -> x_{t-1} for the UNet's prediction model_output. timestep is a scalar or one per
    sample. Only the mean depends on theta.

    With abar = alpha-bar at t, the prediction gives the clean sample and the noise it implies:
        epsilon (SD 1.x, SDXL):  eps = model_output,
                                 x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        v (SD 2.x at 768 px):    v = sqrt(abar) eps - sqrt(1 - abar) x0, so
                                 x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v,
                                 eps = sqrt(abar) v + sqrt(1 - abar) x_t
    and the step is the same for both:
        x_{t-1} = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma_t^2) eps + sigma_t z."""
    if flow.is_flow(scheduler):  # beyond the paper: a flow model's SDE step (machinery/flow.py)
        return flow.sde_mean_std(scheduler, model_output, timestep, sample)
    if eta <= 0:
        raise ValueError(
            f"eta={eta}: a DDIM step with eta <= 0 is deterministic and has no log-prob"
        )
    prediction, thresholding = scheduler.config.prediction_type, scheduler.config.thresholding
    if prediction not in PREDICTION_TYPES or thresholding:
        thresholded = " with thresholding" if thresholding else ""
        supported = " and ".join(PREDICTION_TYPES)
        raise ValueError(
            f"prediction_type {prediction!r}{thresholded}: only {supported} without thresholding"
        )

    # alpha-bar at t and at the previous timestep t' of the inference schedule
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device)
    final = scheduler.final_alpha_cumprod.to(sample.device)  # for t' < 0
    abar = alphas_cumprod[t]
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final)
    abar, abar_prev = (a.view(-1, *[1] * (sample.ndim - 1)) for a in (abar, abar_prev))

    if prediction == "epsilon":
        eps = model_output.float()
        x0_hat = (sample - (1 - abar).sqrt() * eps) / abar.sqrt()
    else:
        v = model_output.float()
        x0_hat = abar.sqrt() * sample - (1 - abar).sqrt() * v
        eps = abar.sqrt() * v + (1 - abar).sqrt() * sample
    if scheduler.config.clip_sample:
        bound = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-bound, bound)
    variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    std = eta * variance.sqrt()  # sigma_t
    # 1 - abar' - sigma_t^2 >= 0 exactly; at eta 1 on a zero-SNR schedule's first step (abar = 0)
    # it is 0, which rounding can make a tiny negative number: clamped, its root is 0, not NaN
    direction = (1 - abar_prev - std**2).clamp(min=0).sqrt()
    mean = abar_prev.sqrt() * x0_hat + direction * eps
    return mean, std


def reduce_elements(values, reduce):
    """Per-element values (B, C, h, w) -> per sample. "sum" over the latent's elements is the true
    log-density (or KL); "mean" divides it by their count, as the public DDPO code does and as its
    clip range 1e-4 assumes (a summed ratio over 16,384 elements explodes at once); "none" keeps
    them."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: use one of {REDUCTIONS}")
    if reduce == "none":
        return values
    dims = tuple(range(1, values.ndim))
    return values.mean(dim=dims) if reduce == "mean" else values.sum(dim=dims)


def gaussian_log_prob(action, mean, std, reduce="mean"):
    """log N(x_{t-1}; mean_t, sigma_t^2 I), element by element, then reduced. The action is data,
    not a function of theta."""
    squared = (action.detach() - mean) ** 2
    log_prob = -squared / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return reduce_elements(log_prob, reduce)


def policy_kl(scheduler, model_output, base_output, timestep, sample, eta=1.0, reduce="mean"):
    """KL(p_theta(. | s_t) || p_base(. | s_t)), the leash to the pretrained model (not in DDPO:
    DPOK, arXiv 2305.16381, and Flow-GRPO, arXiv 2505.05470, add it), from the two models'
    predictions at the state (c, t, x_t). Both steps are Gaussians with the same sigma_t, so it is
    ||mean_t - base_mean_t||^2 / (2 sigma_t^2), element by element, reduced like the log-prob. The
    base policy is fixed: the gradient flows through model_output only."""
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    base_mean, _ = ddim_mean_std(scheduler, base_output.detach(), timestep, sample, eta)
    return reduce_elements((mean - base_mean) ** 2 / (2 * std**2), reduce)


def ddim_step_with_logprob(
    scheduler,
    model_output,
    timestep,
    sample,
    eta=1.0,
    prev_sample=None,
    generator=None,
    reduce="mean",
):
    """One DDIM step x_t -> x_{t-1} and log p_theta(x_{t-1} | x_t, c) (paper, section 4.3): the one
    function that computes the policy's log-prob. Sampling calls it to draw an action; the update
    and the notebook call it with prev_sample, the stored action, to score it under today's weights,
    after the same guided prediction (guided_eps) at the stored state.
    reduce: "mean" (the default, as the public code), "sum" or "none" (reduce_elements).
    """
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    return prev_sample.detach(), gaussian_log_prob(prev_sample, mean, std, reduce)


def unet_eps(unet, latents, timesteps, cond):
    """The UNet's prediction at (x_t, t, c). SDXL's c carries its added conditioning in its last
    row (encode_prompts): the pooled text embedding and the six size and crop ids."""
    if flow.is_transformer(unet):  # beyond the paper: SD3's velocity (machinery/flow.py)
        return flow.transformer_velocity(unet, latents, timesteps, cond)
    if unet.config.addition_embed_type != "text_time":
        return unet(latents, timesteps, cond).sample
    time_ids = 6 * unet.config.addition_time_embed_dim
    pooled = unet.add_embedding.linear_1.in_features - time_ids  # the pooled embedding's width
    added = {"text_embeds": cond[:, -1, :pooled], "time_ids": cond[:, -1, pooled : pooled + 6]}
    return unet(latents, timesteps, cond[:, :-1], added_cond_kwargs=added).sample


def guided_eps(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale):
    """The policy's noise prediction. Classifier-free guidance is part of the policy (paper,
    appendix E.1 "CFG Training"): eps = eps_u + w (eps_c - eps_u), eps_u from the empty prompt.
    Sampling and training both call this, so the trained log-prob is the sampled one."""
    if guidance_scale <= 1:
        return unet_eps(unet, latents, timesteps, prompt_embeds)
    negative = negative_embeds.expand(len(latents), -1, -1)
    both = [
        torch.cat(pair)
        for pair in ((latents, latents), (timesteps, timesteps), (negative, prompt_embeds))
    ]
    eps_u, eps_c = unet_eps(unet, *both).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def encode_prompts(pipe, prompts, guidance=False):
    """The conditioning c of each prompt, frozen (guidance: the empty prompt of classifier-free
    guidance). SD 1.x and 2.x: CLIP's (tokens, dim) embeddings. SDXL has two text encoders and
    conditions its UNet on more than their tokens: the pooled embedding and the image's size and
    crop (time ids (H, W), (0, 0), (H, W), its pipeline's defaults); they go into one more row of
    c, which unet_eps takes apart, so that c stays one tensor a prompt wherever the trajectories
    keep it. Its guidance prompt is zeros, as its force_zeros_for_empty_prompt makes it."""
    device = pipe.unet.device
    if flow.is_transformer(pipe.unet):  # beyond the paper: SD3's three encoders (machinery/flow.py)
        return flow.encode_prompts(pipe, prompts)
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.encode_prompt(list(prompts), device, 1, False)[0]
    tokens, _, pooled, _ = pipe.encode_prompt(
        list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    if guidance and pipe.config.force_zeros_for_empty_prompt:
        tokens, pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ids = torch.tensor([size, size, 0, 0, size, size], dtype=tokens.dtype, device=device)
    extra = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=device)
    extra[:, 0, : pooled.shape[-1]] = pooled
    extra[:, 0, pooled.shape[-1] : pooled.shape[-1] + 6] = ids
    return torch.cat([tokens, extra], dim=1)


def decode(pipe, latents):
    """The images of latents x_0, in [0, 1] (SDXL's VAE in fp32, outside autocast)."""
    fp32 = getattr(pipe, "text_encoder_2", None) is not None
    with torch.autocast(latents.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        shift = pipe.vae.config.get("shift_factor") or 0  # SD3's VAE is shifted, SD's is not
        latents = (latents / pipe.vae.config.scaling_factor + shift).to(pipe.vae.dtype)
        decoded = pipe.vae.decode(latents).sample
    return pipe.image_processor.postprocess(decoded.float(), output_type="pt")


@torch.no_grad()
def sample_trajectories(
    pipe, prompts, num_steps=50, guidance_scale=5.0, eta=1.0, batch_size=8, generator=None, **beyond
):
    """Roll out the policy once per prompt, batch_size at a time.

    Returns a dict of tensors, batch first: latents (B, T+1, C, h, w) from x_T to x_0, log_probs
    (B, T; reduce "none": B, T, C, h, w) of each taken step, timesteps (B, T), prompt_embeds (B,
    tokens, dim), negative_embeds (1, tokens, dim), images (B, 3, H, W) in [0, 1]; prompts, B strs.

    beyond: options beyond the paper (machinery/run.py gives them). reduce, the log-prob's
    (reduce_elements); progress, a bar; base, the base policy: then also kl_to_base (B, T),
    policy_kl at every state, one more guided forward a step; after_batch(images, prompts, start,
    total), called after each batch; stochastic, a bool per step: only those steps draw with eta,
    the others are deterministic DDIM steps whose log_probs are NaN, never trained
    (machinery/successors.py); initial_latents (B, C, h, w), each x_T instead of a draw.
    """
    device, reduce, base = pipe.unet.device, beyond.get("reduce", "mean"), beyond.get("base")
    stochastic = beyond.get("stochastic")
    stochastic = torch.ones(num_steps, dtype=torch.bool) if stochastic is None else stochastic
    pipe.scheduler.set_timesteps(num_steps, device=device)
    negative_embeds = encode_prompts(pipe, [""], guidance=True)
    config = pipe.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    batches, starts = [], range(0, len(prompts), batch_size)
    for start in tqdm(
        starts, "sampling", disable=None if beyond.get("progress") else True, leave=False
    ):
        batch_prompts = list(prompts[start : start + batch_size])
        n = len(batch_prompts)
        prompt_embeds = encode_prompts(pipe, batch_prompts)
        if beyond.get("initial_latents") is None:  # x_T ~ N(0, I)
            x_T = randn_tensor((n, *shape), generator=generator, device=device)
            latents = [x_T * pipe.scheduler.init_noise_sigma]
        else:
            latents = [beyond["initial_latents"][start : start + n]]
        log_probs, kls = [], []
        for step, t in enumerate(pipe.scheduler.timesteps):
            state = (latents[-1], t.expand(n), prompt_embeds, negative_embeds, guidance_scale)
            eps = guided_eps(pipe.unet, *state)
            if stochastic[step]:  # a_t = x_{t-1} ~ p_theta(. | s_t), and its log-prob
                x_prev, log_prob = ddim_step_with_logprob(
                    pipe.scheduler, eps, t, latents[-1], eta, generator=generator, reduce=reduce
                )
            else:  # beyond the paper: a deterministic DDIM step, without a log-prob
                x_prev = pipe.scheduler.step(eps, t, latents[-1], eta=0.0).prev_sample
                log_prob = torch.full_like(reduce_elements(eps.float(), reduce), float("nan"))
            if base is not None:  # beyond the paper: the KL to the base policy at s_t
                with base() as base_unet:
                    base_eps = guided_eps(base_unet, *state)
                kl = policy_kl(pipe.scheduler, eps, base_eps, t, latents[-1], eta, reduce)
                kls.append(kl if stochastic[step] else torch.full_like(kl, float("nan")))
            latents.append(x_prev)
            log_probs.append(log_prob)
        batches.append(
            {
                "latents": torch.stack(latents, dim=1),
                "log_probs": torch.stack(log_probs, dim=1),
                "timesteps": pipe.scheduler.timesteps.expand(n, -1),
                "prompt_embeds": prompt_embeds,
                "images": decode(pipe, latents[-1]),
                **({"kl_to_base": torch.stack(kls, dim=1)} if base is not None else {}),
            }
        )
        if beyond.get("after_batch") is not None:
            beyond["after_batch"](batches[-1]["images"], batch_prompts, start, len(prompts))
    trajectories = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    stochastic = torch.as_tensor(stochastic)
    return {
        **trajectories,
        "negative_embeds": negative_embeds,
        "prompts": list(prompts),
        "stochastic": stochastic,
    }

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

import math
from typing import Callable, NamedTuple

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

REDUCTIONS = ("mean", "sum", "none")
# what the UNet predicts: SD 1.x the noise; a v-prediction model (scheduler's prediction_type)
# the velocity v
PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_scheduler(scheduler):
    """The model's scheduler made DDIM (Song et al. 2021), with the model's own noise schedule and
    prediction type: the sampler whose steps with eta > 0 are the policy (section 4.3)."""
    return DDIMScheduler.from_config(scheduler.config)


def ddim_mean_std(scheduler, model_output, timestep, sample, eta=1.0):
    """The policy's Gaussian at state (c, t, x_t) (paper, section 4.3): mean_t and sigma_t of the
    DDIM step x_t -> x_{t-1} for the UNet's prediction model_output. timestep is a scalar or one per
    sample. Only the mean depends on theta.

    With abar = alpha-bar at t, the prediction gives the clean sample and the noise it implies:
        epsilon (SD 1.x):        eps = model_output,
                                 x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        v_prediction:            v = sqrt(abar) eps - sqrt(1 - abar) x0, so
                                 x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v,
                                 eps = sqrt(abar) v + sqrt(1 - abar) x_t
    and the step is the same for both:
        x_{t-1} = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma_t^2) eps + sigma_t z."""
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


def step_with_logprob(
    scheduler,
    model_output,
    timestep,
    sample,
    eta=1.0,
    prev_sample=None,
    generator=None,
    reduce="mean",
    mean_std=ddim_mean_std,
):
    """One policy step x_t -> x_{t-1} and log p_theta(x_{t-1} | x_t, c) (paper, section 4.3): the
    one function that computes the policy's log-prob. Sampling calls it to draw an action; the
    update and the notebook call it with prev_sample, the stored action, to score it under today's
    weights, after the same guided prediction (guided_prediction) at the stored state.
    reduce: "mean" (the default, as the public code), "sum" or "none" (reduce_elements).
    mean_std: the step's Gaussian, the DDIM step's (the paper's) or a model family's (Policy).
    """
    mean, std = mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    return prev_sample.detach(), gaussian_log_prob(prev_sample, mean, std, reduce)


def unet_eps(unet, latents, timesteps, cond):
    """The UNet's prediction at (x_t, t, c): the noise eps (a v-prediction model's: velocity v)."""
    return unet(latents, timesteps, cond).sample


def guided_prediction(
    unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale, predict=unet_eps
):
    """The policy's prediction: the noise eps for SD 1.x (predict: the denoiser's call, the UNet's
    or a model family's, whatever it predicts). Classifier-free guidance is part of the policy
    (paper, appendix E.1 "CFG Training"): eps = eps_u + w (eps_c - eps_u), eps_u from the empty
    prompt. Sampling and training both call this, so the trained log-prob is the sampled one. A
    model distilled to take w as an input (predict marked guidance_input) is called once, with w."""
    if getattr(predict, "guidance_input", False):  # beyond the paper: a guidance-distilled model
        return predict(unet, latents, timesteps, prompt_embeds, guidance_scale)
    if guidance_scale <= 1:
        return predict(unet, latents, timesteps, prompt_embeds)
    negative = negative_embeds.expand(len(latents), -1, -1)
    pairs = ((latents, latents), (timesteps, timesteps), (negative, prompt_embeds))
    eps_u, eps_c = predict(unet, *[torch.cat(pair) for pair in pairs]).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def encode_prompts(pipe, prompts, guidance=False):
    """The conditioning c of each prompt, frozen: CLIP's (tokens, dim) embeddings (guidance: the
    empty prompt of classifier-free guidance, encoded like any other)."""
    return pipe.encode_prompt(list(prompts), pipe.unet.device, 1, False)[0]


def decode(pipe, latents):
    """The images of latents x_0, in [0, 1]."""
    latents = (latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)
    decoded = pipe.vae.decode(latents).sample
    return pipe.image_processor.postprocess(decoded.float(), output_type="pt")


class Policy(NamedTuple):
    """What a model family decides of the policy: the conditioning c of prompts, the denoiser's
    prediction at (x_t, t, c), the step's Gaussian (mean, std) and the decoder. The paper's
    Stable Diffusion 1.x is SD1, this file's functions; the other families give their own
    (machinery/families/), chosen once, when the model loads."""

    encode_prompts: Callable
    predict: Callable
    mean_std: Callable
    decode: Callable


SD1 = Policy(encode_prompts, unet_eps, ddim_mean_std, decode)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts,
    num_steps=50,
    guidance_scale=5.0,
    eta=1.0,
    batch_size=8,
    generator=None,
    policy=SD1,
    reduce="mean",
    progress=False,
    stochastic=None,
    initial_latents=None,
    after_batch=None,
    on_step=None,
    decode_batch_size=None,
):
    """Roll out the policy once per prompt, batch_size at a time.

    Returns a dict of tensors, batch first: latents (B, T+1, C, h, w) from x_T to x_0, log_probs
    (B, T; reduce "none": B, T, C, h, w) of each taken step, timesteps (B, T), prompt_embeds (B,
    tokens, dim), negative_embeds (1, tokens, dim), images (B, 3, H, W) in [0, 1]; prompts, B strs.
    policy: the model family's (Policy; SD1 is the paper's). reduce: the log-prob's
    (reduce_elements). progress: a bar. decode_batch_size: images decoded at a time (speed only).

    Beyond the paper (machinery/ gives them): stochastic, a bool per step: only those steps draw
    with eta, the others are deterministic DDIM steps whose log_probs are NaN, never trained
    (successors.py); initial_latents (B, C, h, w), each x_T instead of a draw; after_batch(images,
    prompts, start, total), called after each batch; on_step(step, t, state, prediction), called
    at each state (the KL to the base policy, leash.KLToBase).
    """
    device = pipe.unet.device
    stochastic = torch.ones(num_steps, dtype=torch.bool) if stochastic is None else stochastic
    pipe.scheduler.set_timesteps(num_steps, device=device)
    negative_embeds = policy.encode_prompts(pipe, [""], guidance=True)
    config = pipe.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    batches, starts = [], range(0, len(prompts), batch_size)
    for start in tqdm(starts, "sampling", disable=None if progress else True, leave=False):
        batch_prompts = list(prompts[start : start + batch_size])
        n = len(batch_prompts)
        prompt_embeds = policy.encode_prompts(pipe, batch_prompts)
        if initial_latents is None:  # x_T ~ N(0, I)
            x_T = randn_tensor((n, *shape), generator=generator, device=device)
            latents = [x_T * pipe.scheduler.init_noise_sigma]
        else:  # beyond the paper: the x_T's given
            latents = [initial_latents[start : start + n]]
        log_probs = []
        for step, t in enumerate(pipe.scheduler.timesteps):
            state = (latents[-1], t.expand(n), prompt_embeds, negative_embeds, guidance_scale)
            eps = guided_prediction(pipe.unet, *state, predict=policy.predict)
            if stochastic[step]:  # a_t = x_{t-1} ~ p_theta(. | s_t), and its log-prob
                args = (pipe.scheduler, eps, t, latents[-1], eta)
                x_prev, log_prob = step_with_logprob(
                    *args, generator=generator, reduce=reduce, mean_std=policy.mean_std
                )
            else:  # beyond the paper: a deterministic DDIM step, without a log-prob
                x_prev = pipe.scheduler.step(eps, t, latents[-1], eta=0.0).prev_sample
                log_prob = torch.full_like(reduce_elements(eps.float(), reduce), float("nan"))
            if on_step is not None:  # beyond the paper: a measurement at s_t
                on_step(step, t, state, eps)
            latents.append(x_prev)
            log_probs.append(log_prob)
        x_0 = latents[-1].split(decode_batch_size or n)  # decoded a few at a time
        batches.append(
            {
                "latents": torch.stack(latents, dim=1),
                "log_probs": torch.stack(log_probs, dim=1),
                "timesteps": pipe.scheduler.timesteps.expand(n, -1),
                "prompt_embeds": prompt_embeds,
                "images": torch.cat([policy.decode(pipe, part) for part in x_0]),
            }
        )
        if after_batch is not None:  # beyond the paper: a served reward's request, checks
            after_batch(batches[-1]["images"], batch_prompts, start, len(prompts))
    trajectories = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    shared = {"negative_embeds": negative_embeds, "prompts": list(prompts)}
    return {**trajectories, **shared, "stochastic": torch.as_tensor(stochastic)}

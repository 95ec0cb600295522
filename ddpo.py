"""DDPO's objectives: advantages from rewards, and the losses whose gradients train the policy.

Denoising as a Markov decision process (Black et al. 2023, section 4.1):

    state    s_t = (c, t, x_t)          prompt, timestep, current latent
    action   a_t = x_{t-1}              the next latent
    policy   pi(a_t | s_t) = p_theta(x_{t-1} | x_t, c), one DDIM step with eta > 0 (sampler.py)
    start    c ~ p(c), t = T, x_T ~ N(0, I)
    step     deterministic: (c, t, x_t) -> (c, t - 1, x_{t-1})
    reward   r(x_0, c) after the last step, 0 before it (rewards.py)

Every step of a trajectory shares the trajectory's one reward, so each step's advantage is the
normalised reward of its sample (section 4.3). The objective J = E[r(x_0, c)] has the gradient
(section 4.2)

    grad J = E[ sum_t grad log p_theta(x_{t-1} | x_t, c) * A ]

estimated directly (DDPO_SF, REINFORCE) or through importance ratios with a PPO-style clip so
that one batch of samples can feed several updates (DDPO_IS).
"""
from collections import defaultdict, deque

import numpy as np
import torch


class PerPromptStatTracker:
    """Normalises each reward by the recent rewards of its own prompt (section 4.3).

    Each prompt keeps a buffer of its last buffer_size rewards. Once the buffer holds min_count
    rewards its mean and std are used, before that the whole batch's: A = (r - mean) / (std + 1e-6).
    """

    def __init__(self, buffer_size=32, min_count=16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts, rewards):
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in set(prompts):
            rows = np.array([p == prompt for p in prompts])
            buffer = self.buffers[prompt]
            buffer.extend(rewards[rows])
            ref = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[rows] = (rewards[rows] - ref.mean()) / (ref.std() + 1e-6)
        return advantages


def batch_advantages(rewards):
    """Without per-prompt tracking: normalise over the batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def ddpo_sf_loss(log_prob, advantages, adv_clip_max):
    """DDPO_SF (section 4.2): minus the score-function surrogate, whose gradient is
    -E[A * grad log p_theta]. Valid only on-policy: one update per batch of samples."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return -(advantages * log_prob).mean()


def ddpo_is_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """DDPO_IS (section 4.2, with the PPO clip of Schulman et al. 2017): with
    ratio = p_theta / p_old, the loss max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), averaged.
    At ratio 1 its gradient is DDPO_SF's; once the ratio leaves the clip range in the direction the
    advantage favours, the gradient is zero."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


@torch.no_grad()
def diagnostics(log_prob, old_log_prob, clip_range):
    """approx_kl = 0.5 E[(log p - log p_old)^2] and the fraction of ratios outside the clip range."""
    diff = log_prob - old_log_prob
    return {
        "approx_kl": 0.5 * (diff**2).mean().item(),
        "clipfrac": ((diff.exp() - 1).abs() > clip_range).float().mean().item(),
    }

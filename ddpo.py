"""DDPO's objectives: advantages from rewards, and the losses whose gradients train the policy.

The policy is sampler.py's DDIM step, in the MDP stated at the top of that file: states (c, t, x_t),
actions x_{t-1}, and one reward r(x_0, c) after the last step. Every step of a trajectory shares
the trajectory's one reward, so each step's advantage is the normalised reward of its sample
(appendix D.3, "Reward Normalization"). The objective J = E[r(x_0, c)] has the gradient
(section 4.3, "Policy gradient estimation")

    grad J = E[ sum_t grad log p_theta(x_{t-1} | x_t, c) * A ]

estimated directly (DDPO_SF, REINFORCE) or through importance ratios with a PPO-style clip so
that one batch of samples can feed several updates (DDPO_IS). Two baselines and one extension
share the loop: reward-weighted regression (RWR, dense or sparse; section 4.2), which treats the
whole chain as one bandit step and regresses on its own best samples, and pixel-wise PXPO, which
gives every latent position its own advantage from a per-pixel reward map.
"""

from collections import defaultdict, deque

import numpy as np
import torch
import torch.nn.functional as F


def scalar(rewards):
    """One reward per image: a reward map's mean over its pixels, a scalar reward unchanged."""
    return rewards.flatten(1).mean(dim=1) if rewards.dim() > 1 else rewards


class PerPromptStatTracker:
    """Normalises each reward by the recent rewards of its own prompt (appendix D.3, "Reward
    Normalization": a running mean and std tracked for each prompt independently).

    Each prompt keeps a buffer of its last buffer_size rewards. Once the buffer holds min_count
    rewards its mean and std are used, before that the whole batch's: A = (r - mean) / (std + 1e-6).
    Given reward maps (B, h, w) too (PXPO), each position R_ij of a map is normalised by the same
    statistics of its prompt's scalar rewards, A_ij = (R_ij - mean) / (std + 1e-6), which is A
    wherever the map is flat. With per_position, the buffers hold the maps instead, and each
    position is normalised by its prompt's mean and std at that position.
    """

    def __init__(self, buffer_size=32, min_count=16, per_position=False):
        self.buffer_size, self.min_count, self.per_position = buffer_size, min_count, per_position
        self.buffers = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts, rewards, maps=None):
        rewards = np.asarray(rewards, dtype=np.float64)
        values = rewards if maps is None else np.asarray(maps, dtype=np.float64)
        tracked = values if self.per_position else rewards
        advantages = np.empty_like(values)
        for prompt in set(prompts):
            rows = np.array([p == prompt for p in prompts])
            buffer = self.buffers[prompt]
            buffer.extend(tracked[rows])
            ref = np.asarray(buffer) if len(buffer) >= self.min_count else tracked
            mean, std = (
                (ref.mean(axis=0), ref.std(axis=0))
                if self.per_position
                else (ref.mean(), ref.std())
            )
            advantages[rows] = (values[rows] - mean) / (std + 1e-6)
        return advantages

    def state_dict(self):
        """The buffers as plain data and tensors (a checkpoint loads them weights_only)."""
        if self.per_position:
            return {
                prompt: torch.as_tensor(np.asarray(values))
                for prompt, values in self.buffers.items()
            }
        return {prompt: [float(v) for v in values] for prompt, values in self.buffers.items()}

    def load_state_dict(self, buffers):
        for prompt, values in buffers.items():
            self.buffers[prompt] = deque(
                np.asarray(values) if self.per_position else values, maxlen=self.buffer_size
            )


def batch_advantages(rewards, maps=None, per_position=False):
    """Without per-prompt tracking: normalise over the batch (maps: each position by the batch's
    scalar rewards, or with per_position by the batch's maps at that position)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if maps is None:
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    maps = np.asarray(maps, dtype=np.float64)
    if per_position:
        return (maps - maps.mean(axis=0)) / (maps.std(axis=0) + 1e-6)
    return (maps - rewards.mean()) / (rewards.std() + 1e-6)


def advantages(algo, prompts, rewards, latent_size, tracker=None, per_position=False):
    """Each sample's advantage as a tensor: its reward normalised by its prompt's statistics
    (tracker) or the batch's (appendix D.3). PXPO: the same for each latent position of the reward
    map pooled to latent_size (a scalar reward is a flat map)."""
    scores, maps = reward_maps(algo, rewards, latent_size)
    values = (
        tracker.update(prompts, scores, maps)
        if tracker is not None
        else batch_advantages(scores, maps, per_position)
    )
    return torch.as_tensor(values, dtype=torch.float32, device=rewards.device)


def reward_maps(algo, rewards, latent_size):
    """The scalar rewards as an array, and for PXPO each sample's reward map pooled to latent_size
    (a scalar reward is a flat map; None for the other algorithms)."""
    scores = scalar(rewards).cpu().numpy()
    if algo != "pxpo":
        return scores, None
    reward_map = rewards if rewards.dim() == 3 else rewards[:, None, None].expand(-1, *latent_size)
    return scores, pool_to_latent(reward_map, latent_size).cpu().numpy()


def ddpo_sf_loss(log_prob, advantages, adv_clip_max):
    """DDPO_SF (section 4.3, "Policy gradient estimation"): minus the score-function surrogate,
    whose gradient is -E[A * grad log p_theta]. Valid only on-policy: one update per batch of
    samples (appendix D.1: one update on all 256)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return -(advantages * log_prob).mean()


def ddpo_is_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """DDPO_IS (section 4.3; the PPO clip of Schulman et al. 2017, appendix D.1): with
    ratio = p_theta / p_old, the loss max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), averaged.
    At ratio 1 its gradient is DDPO_SF's; once the ratio leaves the clip range in the direction the
    advantage favours, the gradient is zero."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def policy_loss(algo, log_prob, element_log_prob, old_log_prob, advantages, clip_range, clip_max):
    """--algo's loss on a minibatch's states: from their actions' log-probs now (mean, and each
    element's) and at sampling, and their advantages. A new algorithm: its loss, and a line here."""
    if algo in ("ddpo-is", "awm"):  # the clipped ratio p_theta / p_old (AWM's p: matching.py)
        return ddpo_is_loss(log_prob, old_log_prob, advantages, clip_range, clip_max)
    if algo == "ddpo-sf":  # the score function (REINFORCE), on-policy
        return ddpo_sf_loss(log_prob, advantages, clip_max)
    if algo == "pxpo":  # every latent position its own advantage
        return pxpo_loss(element_log_prob, advantages, clip_max)
    raise ValueError(f"algo {algo!r}: no loss of the steps' log-probs (rwr: rwr_loss; nft: nft.py)")


@torch.no_grad()
def diagnostics(log_prob, old_log_prob, clip_range):
    """approx_kl = 0.5 E[(log p - log p_old)^2] and the fraction of ratios outside the clip range
    (0-d tensors: reading them would wait for the GPU at every step; the epoch's means are read
    once)."""
    diff = log_prob - old_log_prob
    return {
        "approx_kl": 0.5 * (diff**2).mean(),
        "clipfrac": ((diff.exp() - 1).abs() > clip_range).float().mean(),
    }


def pxpo_loss(log_prob, advantages, adv_clip_max):
    """PXPO (arXiv 2404.04356, in our reading of it): the score-function surrogate with
    one advantage per latent position. log_prob (B, C, h, w) holds each element's log-density,
    advantages (B, h, w); each position's log-prob, its channels summed, is weighted by its own
    advantage, and the sum is divided by the element count as DDPO's mean reduction is. With a
    constant map this is exactly ddpo_sf_loss on the mean log-prob.

    Per-position credit is a heuristic, not an unbiased estimate of the gradient of the mean
    reward: a latent element at one position shapes the others through the later denoising steps
    (the UNet mixes positions) and through the decoder, and those paths go uncredited. Only with a
    flat map (where it is DDPO_SF) is it the policy gradient."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return -(advantages * log_prob.sum(dim=1)).sum() / log_prob.numel()


def pool_to_latent(reward_map, latent_size):
    """A reward map (B, H, W) at image resolution -> (B, h, w): each latent cell gets the mean of
    the H/h x W/w pixel patch it decodes to (an average pool; SD's VAE: 8 x 8 pixels a cell)."""
    return F.adaptive_avg_pool2d(reward_map[:, None].float(), latent_size)[:, 0]


def groups(prompts, n):
    """Index arrays of the samples of each prompt, or one group of all n samples without prompts."""
    return (
        [np.arange(n)]
        if prompts is None
        else [np.flatnonzero([p == q for p in prompts]) for q in set(prompts)]
    )


def rwr_weights(rewards, prompts=None, beta=0.2):
    """Reward-weighted regression (section 4.2; appendix D.2, D.5): w = exp(beta * r) / Z, with Z
    making the weights average 1 over the batch, or over each prompt's samples given prompts.

    beta is an inverse temperature on the reward's own scale, so what it means depends on the
    reward's spread sigma: for normally spread rewards the weights are log-normal, and the share of
    samples that carry 90 % of the weight (the original code's sanity check, `weight_share`) is
    1 - Phi(beta * sigma - 1.28): 90 % at beta = 0 (plain self-training), 30 % at beta * sigma =
    1.81, 10 % at 2.56 (sparse RWR's share), 1 % at 3.61. The original's beta = 0.2 per kB suits
    512 px JPEGs that spread over tens of kB; the bundled model's 64 px images spread over a
    fraction of a kB, so its preset scales beta up to keep the selectivity (machinery/config.py)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.empty_like(rewards)
    for rows in groups(prompts, len(rewards)):
        w = np.exp(beta * (rewards[rows] - rewards[rows].max()))  # shifted: exp cannot overflow
        weights[rows] = w / w.mean()
    return weights


def weight_share(weights, mass=0.9):
    """The smallest share of samples whose weights add up to `mass` of the total weight: how
    selective RWR's weights are (1 for equal weights, 1/n when one sample holds them all)."""
    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    return (np.searchsorted(np.cumsum(w) / w.sum(), mass - 1e-12) + 1) / len(w)


def sparse_rwr_weights(rewards, prompts=None, top=0.1):
    """Sparse RWR (section 4.2, w = 1[r >= C]; appendix D.2 and D.5: C the 90th percentile of a pool
    of samples): weight 1 for the top fraction of rewards, 0 for the rest: top * n of each pool of
    n, rounded half up (at least one).

    The pools: given prompts, each prompt with at least 1 / top samples is a pool of its own (the
    paper's per-prompt threshold, appendix D.3; the original code samples each prompt in batches of
    its own); the samples of the prompts with fewer are ranked together in one pool. Ranking
    those per prompt would keep at least one of every prompt's one, two or three samples: with
    SD v1.4's defaults (398 prompts, 256 samples an epoch) about 70 % of the samples, not 10 %.
    The pool compares rewards across prompts, so where some prompts score higher by nature (an
    aesthetic reward) it favours them, as dense RWR over the round does."""
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.zeros_like(rewards)
    pools = groups(prompts, len(rewards))
    enough = [rows for rows in pools if len(rows) >= round(1 / top)]
    rest = np.concatenate(
        [rows for rows in pools if len(rows) < round(1 / top)] + [np.array([], dtype=int)]
    )
    for rows in enough + ([np.sort(rest)] if len(rest) else []):
        keep = max(1, int(np.floor(top * len(rows) + 0.5)))
        weights[rows[np.argsort(-rewards[rows], kind="stable")[:keep]]] = 1.0
    return weights


def rwr_epoch_weights(algo, prompts, rewards, beta=0.2, per_prompt=False):
    """RWR's weights on an epoch's rewards (a tensor; returns an array): exp(beta * r) (rwr) or 1
    for the top 10 % (rwr-sparse), per prompt or over the epoch, scaled to average 1 over the epoch.

    Where this differs from the original code (jannerm/ddpo): its round is 10,240 samples
    (appendix D.5: 10k samples, 400 updates of 128), here one epoch (256 on SD v1.4); it regresses
    the VAE re-encoding of each decoded image, here the sampled latent x_0 itself; and its dense
    runs weight over the round on compressibility but per prompt on aesthetics, here the flag
    --per-prompt-stat-tracking decides (default off for rwr, as on compressibility)."""
    rewards = rewards.cpu().numpy()
    by_prompt = prompts if per_prompt else None
    weights = (
        rwr_weights(rewards, by_prompt, beta)
        if algo == "rwr"
        else sparse_rwr_weights(rewards, by_prompt)
    )
    return weights / weights.mean()


def rwr_loss(prediction, target, weights):
    """The denoising loss ||target - prediction(x_t, t, c)||^2 (per-element mean) of each sample,
    times its weight, averaged. The target is what the model predicts: the noise eps (SD 1.x) or
    the velocity v (a v-prediction model). With weights scaled to average 1 over the epoch's
    samples, the minibatches of an epoch add up to the weighted mean, on the plain denoising
    loss's scale.

    The prediction is the *guided* one, eps_u + w (eps_c - eps_u) (sampler.guided_prediction), the
    one the sampler uses, as in the original code's RWR runs (its `train_cfg`). Regressing the
    conditional branch alone while sampling with guidance w > 1 trains a different model from the
    one sampled, which the paper's appendix E.1 ("CFG Training", Figure 10) reports degrading
    after the first round."""
    errors = ((prediction.float() - target) ** 2).mean(dim=tuple(range(1, target.dim())))
    return (weights * errors).mean()

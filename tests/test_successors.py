"""The successors' options (successors.py): group advantages, groups of prompts, shared x_T, and a
window of stochastic, trained steps with deterministic DDIM around it."""

import json

import numpy as np
import pytest
import torch
from conftest import perturb_lora, recomputed_log_prob

from machinery import evaluation
from machinery import successors
import train
from machinery.config import Config
from machinery.pipeline import add_trainable, load_pipeline
from sampler import guided_prediction, sample_trajectories


@pytest.mark.math
def test_group_advantages_normalise_each_group_by_its_own_mean_and_std_and_a_flat_group_gets_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, -1.0, 1.0, -1.0, 1.0])
    advantages = successors.group_advantages("ddpo-is", rewards, 4, (8, 8))
    flat = successors.group_stats(Config(advantages="group", samples_per_prompt=4), rewards)[
        "flat_groups"
    ]
    first = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3, population std sqrt(14 / 4)
    by_hand = np.concatenate(
        [
            (first - 3) / (np.sqrt(3.5) + 1e-6),
            np.zeros(4),
            np.array([-1.0, 1.0, -1.0, 1.0]) / (1 + 1e-6),
        ]
    )
    np.testing.assert_allclose(advantages.numpy(), by_hand, rtol=1e-6)
    assert (
        flat == 1 and (advantages[4:8] == 0).all()
    )  # all equal: exactly zero, not (r - mean) / 1e-6 of round-off
    # a group of one prompt's k samples is what the tracker would see with no history and min_count <= k
    pxpo = successors.group_advantages("pxpo", rewards, 4, (2, 2))
    assert pxpo.shape == (12, 2, 2) and torch.allclose(
        pxpo[:, 0, 0], advantages
    )  # a scalar reward is a flat map


@pytest.mark.math
def test_groups_draw_each_prompt_k_times_in_a_row_without_repeats_while_the_set_allows():
    prompt_set = ["a", "b", "c", "d", "e"]
    prompts = successors.draw_groups(prompt_set, np.random.default_rng(0), 24, 4)
    groups = [prompts[g : g + 4] for g in range(0, 24, 4)]
    assert len(prompts) == 24 and all(len(set(group)) == 1 for group in groups)
    assert (
        sorted(group[0] for group in groups[:5]) == prompt_set
    )  # the first 5 groups: every prompt once
    two = successors.draw_groups(prompt_set, np.random.default_rng(0), 8, 4)
    assert two[0] != two[4]


def test_shared_noise_starts_every_sample_of_a_group_from_one_x_T(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    initial = successors.group_noise(pipe, 6, 3, torch.Generator().manual_seed(0))
    traj = sample_trajectories(
        pipe,
        ["a cat"] * 3 + ["a dog"] * 3,
        num_steps=3,
        batch_size=4,
        generator=torch.Generator().manual_seed(1),
        initial_latents=initial,
    )
    x_T = traj["latents"][:, 0]
    assert (
        torch.equal(x_T, initial)
        and torch.equal(x_T[0], x_T[2])
        and torch.equal(x_T[3], x_T[5])
        and not torch.equal(x_T[0], x_T[3])
    )
    assert not torch.equal(
        traj["latents"][0, -1], traj["latents"][1, -1]
    )  # the steps' noise still differs


def test_outside_the_window_the_steps_are_diffusers_deterministic_ddim_with_no_log_prob_and_inside_the_ratio_is_1(
    tiny_pipeline_dir,
):
    pipe = load_pipeline(tiny_pipeline_dir)
    add_trainable(pipe, lora_rank=4)
    perturb_lora(pipe.unet)
    window = torch.tensor([False, True, True, False, False])
    traj = sample_trajectories(
        pipe,
        ["a cat", "a dog", "an owl"],
        num_steps=5,
        guidance_scale=3.0,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        stochastic=window,
    )
    assert torch.equal(traj["stochastic"], window)
    assert (
        traj["log_probs"][:, ~window].isnan().all()
        and traj["log_probs"][:, window].isfinite().all()
    )
    with torch.no_grad():
        for j in range(5):
            x_t, x_prev, t = (
                traj["latents"][:, j],
                traj["latents"][:, j + 1],
                traj["timesteps"][0, j],
            )
            if window[j]:  # the window's steps: recomputed, the log-prob sampled (ratio 1)
                log_prob = recomputed_log_prob(
                    pipe,
                    x_t,
                    x_prev,
                    traj["timesteps"][:, j],
                    traj["prompt_embeds"],
                    traj["negative_embeds"],
                    3.0,
                    1.0,
                )
                assert (log_prob - traj["log_probs"][:, j]).abs().max() < 1e-5
            else:  # the others: diffusers' DDIM step at eta 0, to the bit (in the sampler's batches of 2)
                for rows in (slice(0, 2), slice(2, 3)):
                    eps = guided_prediction(
                        pipe.unet,
                        x_t[rows],
                        traj["timesteps"][rows, j],
                        traj["prompt_embeds"][rows],
                        traj["negative_embeds"],
                        3.0,
                    )
                    assert torch.equal(
                        x_prev[rows], pipe.scheduler.step(eps, t, x_t[rows], eta=0.0).prev_sample
                    )


@pytest.mark.math
def test_the_update_draws_its_trained_steps_from_the_window_alone():
    cfg = Config(inner_epochs=2, batch_size=2)
    steps = torch.tensor([3, 4, 5])
    batches = train.shuffled_microbatches(cfg, 6, np.random.default_rng(0), "cpu", steps, 2)
    for _, step_order in batches:
        assert step_order.shape == (6, 2) and set(step_order.flatten().tolist()) <= {3, 4, 5}
        assert all(
            len(set(row)) == 2 for row in step_order.tolist()
        )  # two different steps of each sample
    # every step is the window's when there is none: the paper's draw, unchanged
    full = train.shuffled_microbatches(cfg, 6, np.random.default_rng(0), "cpu", torch.arange(5), 2)
    order = np.random.default_rng(0)
    order.permutation(6)
    assert np.array_equal(full[0][1].numpy(), order.random((6, 5)).argsort(axis=1)[:, :2])


def test_a_run_with_groups_shared_noise_a_window_and_fewer_steps_than_its_evaluation_trains_only_the_window(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    trained, evaluated = [], []
    step, options, evaluation_sampler = (
        train.step_with_logprob,
        successors.sampling_options,
        evaluation.sample_trajectories,
    )
    monkeypatch.setattr(
        train,
        "step_with_logprob",
        lambda scheduler, eps, t, *rest, **kw: (
            trained.append(set(t.tolist())) or step(scheduler, eps, t, *rest, **kw)
        ),
    )
    monkeypatch.setattr(
        evaluation,
        "sample_trajectories",
        lambda pipe, prompts, steps, *rest, **kw: (
            evaluated.append(steps) or evaluation_sampler(pipe, prompts, steps, *rest, **kw)
        ),
    )
    windows = []
    monkeypatch.setattr(
        successors, "sampling_options", lambda *args: windows.append(options(*args)) or windows[-1]
    )
    out = tmp_path / "run"
    train.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--samples-per-epoch",
            "8",
            "--batch-size",
            "2",
            "--num-steps",
            "4",
            "--eval-num-steps",
            "6",
            "--eval-every",
            "1",
            "--eval-samples",
            "2",
            "--prompts",
            "simple_animals",
            "--samples-per-prompt",
            "4",
            "--advantages",
            "group",
            "--shared-noise",
            "--train-window",
            "2",
            "--timestep-fraction",
            "1",
        ]
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(
        0 <= m["flat_groups"] <= 2 and np.isfinite(m["approx_kl"]) for m in metrics[:2]
    )
    assert evaluated == [
        6,
        6,
        6,
    ]  # the evaluation at its own steps (before epochs 0 and 1, and after 1)
    scheduler = load_pipeline(tiny_pipeline_dir).scheduler
    scheduler.set_timesteps(4)
    assert len(windows) == 2 and all(
        w["stochastic"].sum() == 2 and w["initial_latents"].shape[0] == 8 for w in windows
    )
    per_epoch = len(trained) // 2  # each epoch's forwards: its window's two timesteps, no other
    for epoch, window in enumerate(windows):
        assert set().union(*trained[epoch * per_epoch : (epoch + 1) * per_epoch]) == set(
            scheduler.timesteps[window["stochastic"]].tolist()
        )

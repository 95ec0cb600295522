"""--compile (torch.compile on the UNet) keeps the maths: the ratio is 1 before any update, and a
resumed run is the run that never stopped. Compiling is what takes the time (a minute or more
with an empty cache), and it grows with the UNet's layers, not its widths: these tests use a UNet
of one level (its attention, with the LoRA, in the middle block), and the same shapes in both, so
that the second finds the first's kernels in torch's cache."""
import json

import pytest
import torch

import train
from pipeline import add_trainable, compile_policy, load_pipeline
from pretrain import build_pipeline
from sampler import base_policy, policy_log_prob, sample_trajectories

# one worker runs both, one after the other: the second finds the first's compiled kernels in
# torch's cache instead of compiling them again at the same time
pytestmark = pytest.mark.xdist_group("compile")


@pytest.fixture(scope="module")
def one_level_pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("one-level-sd")
    build_pipeline(image_size=16, vae_channels=(16, 32), unet_channels=(32,), text_dim=32, max_length=16).save_pretrained(path)
    return path


def test_a_compiled_policy_recomputes_the_sampled_log_prob_within_fp32_round_off(one_level_pipeline_dir):
    pipe = load_pipeline(one_level_pipeline_dir)
    add_trainable(pipe.unet, lora_rank=4)
    compile_policy(pipe, base_policy(pipe.unet, 4))
    traj = sample_trajectories(pipe, ["a cat", "a dog"], num_steps=3, guidance_scale=5.0, batch_size=2, generator=torch.Generator().manual_seed(0))
    for j in range(3):  # the training graph (with gradient) against the sampling graph (without)
        log_prob = policy_log_prob(pipe, traj["latents"][:, j], traj["latents"][:, j + 1], traj["timesteps"][:, j],
                                   traj["prompt_embeds"], traj["negative_embeds"], guidance_scale=5.0, eta=1.0)
        assert log_prob.requires_grad and (log_prob - traj["log_probs"][:, j]).abs().max().item() < 1e-5


def test_a_compiled_run_with_the_leash_resumes_exactly(one_level_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["--model", str(one_level_pipeline_dir), "--samples-per-epoch", "8", "--batch-size", "2", "--num-steps", "3", "--prompts", str(prompts),
            "--lr", "1e-2", "--min-count", "4", "--buffer-size", "6", "--compile", "--kl-coef", "0.5"]
    train.main([*args, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    train.main([*args, "--out", str(tmp_path / "resumed"), "--epochs", "1"])
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    metrics = [[{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in (tmp_path / run / "metrics.jsonl").open()]
               for run in ("straight", "resumed")]
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]

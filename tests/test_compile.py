"""--compile (torch.compile on the UNet) keeps the maths: the ratio is 1 before any update, and a
resumed run is the run that never stopped. Compiling is what takes the time (a minute or more
with an empty cache), and it grows with the UNet's layers, not its widths: the tests' tiny pipeline
has a UNet of one level."""

import json

import train


def test_a_compiled_run_has_ratio_1_before_its_first_update_and_with_the_leash_resumes_exactly(
    tiny_pipeline_dir, tmp_path
):
    model, prompts = tiny_pipeline_dir, tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    # one update an epoch: every log-prob of epoch 0 is recomputed by the compiled training graph before the weights move
    args = [
        "--model",
        str(model),
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "2",
        "--num-steps",
        "3",
        "--prompts",
        str(prompts),
        "--updates-per-epoch",
        "1",
        "--lr",
        "1e-2",
        "--min-count",
        "4",
        "--buffer-size",
        "6",
        "--compile",
        "--kl-coef",
        "0.5",
    ]
    train.main([*args, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    train.main([*args, "--out", str(tmp_path / "resumed"), "--epochs", "1"])
    train.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    metrics = [
        [
            {k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in (tmp_path / run / "metrics.jsonl").open()
        ]
        for run in ("straight", "resumed")
    ]
    first = metrics[0][
        0
    ]  # the training graph (with gradient) against the sampling graph (without), in fp32
    assert first["approx_kl"] < 5e-11 and first["clipfrac"] == 0, (
        first
    )  # log-prob differences of 1e-5 at most, on average
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]

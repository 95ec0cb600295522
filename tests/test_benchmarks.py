"""The benchmark scripts run end to end in a reduced mode (a smoke test: no timing is asserted)."""

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare  # noqa: E402
import compile_payback  # noqa: E402
import decode_batch  # noqa: E402
import flux_memory  # noqa: E402
import gpu_check  # noqa: E402
import gpu_memory  # noqa: E402
import kill_soak  # noqa: E402
import kl_overhead  # noqa: E402
import kl_tradeoff  # noqa: E402
import overhead  # noqa: E402
import profile_epoch  # noqa: E402
import reward_cost  # noqa: E402
import same_outputs  # noqa: E402
import time_to_target  # noqa: E402
import machinery.run  # noqa: E402
import train  # noqa: E402
import vs_trl  # noqa: E402


def test_compare_tunes_each_algorithm_then_runs_its_choice_on_other_seeds(
    tiny_pipeline_dir, tmp_path
):
    small = f"--model {tiny_pipeline_dir} --samples-per-epoch 8 --batch-size 2 --num-steps 2 --prompts shapes"
    common = [
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--train-args",
        small,
        "--lrs",
        "1e-3",
        "1e-2",
        "--betas",
        "3",
    ]
    compare.main(["--stage", "tune", *common])
    tuned = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert {reward: sorted(algos) for reward, algos in tuned.items()} == {
        r: sorted(a) for r, a in compare.COMPARISONS.items()
    }
    assert tuned["jpeg"]["rwr"]["chosen"]["beta"] == 3 and tuned["jpeg"]["ddpo-is"]["chosen"][
        "lr"
    ] in (1e-3, 1e-2)
    tuning = (tmp_path / "tune" / "tune.md").read_text()
    choices = sum(len(algos) for algos in compare.COMPARISONS.values())
    assert (
        tuning.count("**yes**") == choices and "lr0.01-beta3" in tuning
    )  # one choice per algorithm and variant, every setting listed
    kept, page = tmp_path / "kept", tmp_path / "page.md"
    final = ["--stage", "final", "--seeds", "0"]
    runs = compare.main([*final, *common, "--keep", str(kept), "--page", str(page)])
    assert sorted(runs) == sorted(
        (reward, algo) for reward, algos in compare.COMPARISONS.items() for algo in algos
    )
    table = (tmp_path / "compare.md").read_text()
    assert (
        "## The tuning (seed 100)" in table
        and table.count("**yes**") == choices
        and (tmp_path / "compare.png").is_file()
    )
    # the page, with the commit and machine, written again from the kept files alone
    written = page.read_text()
    assert (
        "<!-- begin compare" in written and written.count("**yes**") == choices
    ) and "commit `" in written
    again = ["--out", str(kept), "--keep", str(kept), "--page", str(page), "--seeds", "0"]
    compare.main(["--stage", "final", "--epochs", "1", *again])
    assert page.read_text() == written
    # widening one algorithm's grid runs only the new setting and keeps every other result
    compare.main(
        [
            "--stage",
            "tune",
            "--algos",
            "ddpo-sf",
            *common[:-5],
            "--lrs",
            "3e-2",  # only the new one: the earlier two stay in the grid
            "--betas",
            "3",
        ]
    )
    widened = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert [row["setting"]["lr"] for row in widened["jpeg"]["ddpo-sf"]["settings"]] == [
        1e-3,
        1e-2,
        3e-2,
    ]
    assert widened["jpeg"]["rwr"] == tuned["jpeg"]["rwr"]
    # a finished run is reused, not run again
    (rwr_run,) = tmp_path.glob("jpeg-rwr-lr*-seed0")
    before = (rwr_run / "metrics.jsonl").stat().st_mtime
    compare.main(["--stage", "final", "--seeds", "0", *common])
    assert (rwr_run / "metrics.jsonl").stat().st_mtime == before


def test_compare_picks_the_best_reward_among_settings_that_keep_fidelity():
    def run(first, last, kept):
        return [
            {"reward_mean": first, "fidelity": 1.0},
            {"reward_mean": last, "fidelity": kept},
        ], 0.0

    assert compare.choose({"a": run(0, 5, 0.5), "b": run(0, 3, 0.9), "c": run(0, 2, 1.0)}) == "b"
    assert (
        compare.choose({"a": run(0, 5, 0.5), "b": run(0, 3, 0.7)}) == "b"
    )  # none keeps 0.8: the one that keeps most


def test_compare_refuses_a_final_stage_without_its_tuning(tmp_path):
    with pytest.raises(SystemExit, match="run the tuning first"):
        compare.main(["--stage", "final", "--out", str(tmp_path)])


def test_overhead_replays_exactly_the_counted_unet_calls(tiny_pipeline_dir):
    small = [
        "--model",
        str(tiny_pipeline_dir),
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "2",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
    ]
    loader = machinery.run.load_model
    result = overhead.main(["--epochs", "2", "--", *small])
    # one counted epoch: 4 batches x 2 steps, sampling and training (every step trained), and
    # kl_to_base measured at kl-coef 0 on the first batch's first trained step: one base forward
    assert (
        result["sampling_calls"] == 8
        and result["training_calls"] == 8 + 1
        and result["base_calls"] == 1
    )
    leashed = overhead.main(["--epochs", "2", "--", *small, "--kl-coef", "0.1"])
    assert (
        leashed["training_calls"] == 8 + 8 and leashed["base_calls"] == 8
    )  # with the penalty: one for every trained step
    assert 0 < result["overhead_ratio"] < float("inf")
    assert machinery.run.load_model is loader  # the instrumentation is undone


def test_gpu_memory_runs_in_reduced_mode_on_the_cpu():
    rows = gpu_memory.main(
        ["--arch", "tiny", "--device", "cpu", "--batch-sizes", "1", "2", "--num-steps", "2"]
    )
    assert [row[0] for row in rows] == [1, 2]
    assert all(
        peak is None and sampling > 0 and training > 0 for _, peak, sampling, training, _ in rows
    )


def test_gpu_check_records_each_check_as_it_is_measured_and_a_spent_budget_skips_the_rest(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    """The GPU script's dry run, reduced: one check in its own process, two in this one (the memory table cut to two rows)."""
    out, model = tmp_path / "out", str(tiny_pipeline_dir)
    gpu_check.main(
        [
            "--out",
            str(out),
            "--model",
            model,
            "--device",
            "cpu",
            "--num-steps",
            "2",
            "--budget",
            "600",
            "--checks",
            "exactness",
        ]
    )
    monkeypatch.setattr(gpu_check, "MEMORY", [("bf16", 1, False, 5), ("no", 2, True, 1)])
    for check in ("default", "memory"):
        gpu_check.main(
            [
                "--out",
                str(out),
                "--check",
                check,
                "--model",
                model,
                "--device",
                "cpu",
                "--num-steps",
                "2",
            ]
        )
    results = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert results[0]["check"] == "environment"  # what ran comes first: every package's version
    assert results[0]["packages"]["diffusers"] == importlib.metadata.version("diffusers")
    exact = [r for r in results if r["check"] == "exactness"]
    assert [r["mixed_precision"] for r in exact] == ["no", "bf16"]
    assert all(
        r["minibatch_steps"] == 4 and 0 <= r["max_abs_ratio_minus_1"] < 1e-4 for r in exact
    ), exact  # 2 minibatches x 2 steps
    (default,) = [r for r in results if r["check"] == "default"]
    assert (
        default["fits"]
        and default["batch_size"] == 8
        and default["mixed_precision"] == "no"
        and default["samples"] == 32
    )
    memory = [r for r in results if r["check"] == "memory"]
    assert [
        (
            r["mixed_precision"],
            r["train_batch"],
            r["gradient_checkpointing"],
            r["steps_per_forward"],
        )
        for r in memory
    ] == gpu_check.MEMORY
    assert all(
        r["peak_gib"] is None and r["epoch_per_s"] > 0 for r in memory
    )  # no CUDA: no peak to read
    gpu_check.main(
        [
            "--out",
            str(out),
            "--model",
            model,
            "--device",
            "cpu",
            "--budget",
            "0",
            "--checks",
            "torchrun",
        ]
    )
    assert json.loads((out / "gpu_check.jsonl").read_text().splitlines()[-1]) == {
        "check": "torchrun",
        "skipped": "the budget of 0 s was spent",
    }


def test_kl_overhead_runs_its_three_arms_interleaved(tiny_pipeline_dir):
    small = [
        "--model",
        str(tiny_pipeline_dir),
        "--samples-per-epoch",
        "4",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
    ]
    update = train.update
    seconds = kl_overhead.main(["--repeats", "1", "--epochs", "2", "--", *small])
    assert list(seconds) == ["no kl_to_base", "kl-coef 0", "kl-coef 1"] and all(
        len(v) == 1 and v[0] > 0 for v in seconds.values()
    )
    assert train.update is update  # the arm without the measurement is undone


def test_kl_tradeoff_runs_each_coefficient_and_reports_the_heldout_prompts(tmp_path):
    small = "--samples-per-epoch 16 --batch-size 4 --num-steps 2"
    rows = kl_tradeoff.main(
        [
            "--out",
            str(tmp_path),
            "--epochs",
            "2",
            "--coefs",
            "0",
            "1",
            "--seeds",
            "0",
            "--eval-every",
            "1",
            "--eval-samples",
            "15",
            "--train-args",
            small,
            "--keep",
            str(tmp_path / "kept"),
            "--page",
            str(tmp_path / "page.md"),
        ]
    )
    assert sorted(rows) == [(0.0, 0), (1.0, 0)]
    for row, _ in rows.values():
        assert (
            0 <= row["kept"]
            and row["kl_to_base"] > 0
            and {"eval_trained_cut", "eval_heldout_cut", "carried"} <= set(row)
        )
    assert (
        "| 1 | 0 |" in (tmp_path / "kl_tradeoff.md").read_text()
        and (tmp_path / "kl_tradeoff.png").is_file()
    )
    # the runs' result files kept (no weights), and the page written from them alone
    kept = tmp_path / "kept" / "kl1-seed0"
    assert {p.name for p in kept.iterdir()} == {
        "metrics.jsonl",
        "run.json",
        "wall_seconds.txt",
        "config.json",
    }
    page = (tmp_path / "page.md").read_text()
    again = kl_tradeoff.main(
        ["--out", str(tmp_path / "kept"), "--keep", str(tmp_path / "kept")]
        + ["--coefs", "0", "1", "--seeds", "0", "--page", str(tmp_path / "page.md")]
    )
    # repr: a 2-epoch run's "carried" may be NaN (no trained cut), and NaN != NaN
    assert repr(again) == repr(rows) and (tmp_path / "page.md").read_text() == page
    assert "<!-- begin kl_tradeoff seeds 0" in page and "| 1 | " in page and "Made by" in page


def test_vs_trl_times_each_side_in_turn_and_skips_trl_where_it_is_not_installed(
    tiny_pipeline_dir, tmp_path
):
    sides = ["ours", "trl"] if importlib.util.find_spec("trl") else ["ours"]
    runs = vs_trl.main(
        [
            "--pairs",
            "1",
            "--epochs",
            "2",
            "--sides",
            *sides,
            "--model",
            str(tiny_pipeline_dir),
            "--reduced",
            "--keep",
            str(tmp_path / "vs_trl.json"),
            "--page",
            str(tmp_path / "page.md"),
        ]
    )
    assert list(runs) == sides
    page = (tmp_path / "page.md").read_text()  # written again from the kept file alone, the same
    assert "<!-- begin vs_trl" in page and "| ours |" in page and "commit `" in page
    vs_trl.main(
        ["--report", "--keep", str(tmp_path / "vs_trl.json"), "--page", str(tmp_path / "page.md")]
    )
    assert (tmp_path / "page.md").read_text() == page
    for (
        run,
    ) in runs.values():  # one run a side, two epochs, each holding its sampling and its update
        assert len(run["epoch"]) == 2 and all(
            0 < run["sampling"][k] + run["update"][k] < run["epoch"][k] for k in range(2)
        )


def test_compile_payback_times_whole_demo_runs_with_their_epochs(
    tiny_pipeline_dir, capsys, tmp_path
):
    """The eager arm only: the compiled arms add --compile (tests/test_compile.py), and compiling even the tiny UNet takes over a minute."""
    small = [
        "--model",
        str(tiny_pipeline_dir),
        "--samples-per-epoch",
        "4",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        "2",
        "--prompts",
        "simple_animals",
        "--epochs",
        "2",
    ]
    kept = ["--keep", str(tmp_path / "payback.json"), "--page", str(tmp_path / "page.md")]
    runs = compile_payback.main(["--rounds", "2", "--arms", "eager", *kept, "--", *small])
    assert list(runs) == ["eager"] and len(runs["eager"]) == 2
    for result in runs[
        "eager"
    ]:  # the wall clock holds the epochs, and the process start and model loading besides
        assert len(result["epochs"]) == 2 and result["wall"] > sum(result["epochs"]) > 0
    assert "| eager |" in capsys.readouterr().out
    page = (tmp_path / "page.md").read_text()
    compile_payback.main(["--report", *kept])  # written again from the kept file alone, the same
    assert "<!-- begin compile_payback" in page and (tmp_path / "page.md").read_text() == page


def test_same_outputs_finds_two_checkouts_of_one_revision_identical_and_a_changed_value_not(
    tiny_pipeline_dir, tmp_path
):
    if subprocess.run(
        ["git", "-C", str(same_outputs.ROOT), "rev-parse", "HEAD"], capture_output=True
    ).returncode:
        pytest.skip(
            "same_outputs checks revisions out of git: this copy of the project is not a git checkout"
        )
    small = f"--model {tiny_pipeline_dir} --samples-per-epoch 8 --batch-size 2 --num-steps 2 --prompts simple_animals"
    assert (
        same_outputs.main(
            [
                "HEAD",
                "HEAD",
                "--runs",
                "ddpo-is",
                "--epochs",
                "1",
                "--train-args",
                small,
                "--work",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert not (tmp_path / "before").exists()  # the worktrees are removed
    before, after = (
        same_outputs.written(tmp_path / "runs" / side / "ddpo-is") for side in ("before", "after")
    )
    assert all(same_outputs.same(before[part], after[part]) for part in before)
    after["checkpoint"]["trainable"] = {
        k: v + 1e-7 for k, v in after["checkpoint"]["trainable"].items()
    }
    after["metrics"][0] = [
        (key, value + 1e-12 if key == "loss" else value) for key, value in after["metrics"][0]
    ]
    assert not same_outputs.same(
        before["checkpoint"], after["checkpoint"]
    ) and not same_outputs.same(before["metrics"], after["metrics"])


def test_time_to_target_finds_the_first_evaluation_of_a_held_target_and_counts_the_training_before_it(
    monkeypatch,
):
    monkeypatch.setattr(time_to_target, "CUT", 0.30)
    monkeypatch.setattr(time_to_target, "FIDELITY", 0.95)

    def epoch(e, cut, kept, evaluated=True):
        m = {
            "epoch": e,
            "sample_seconds": 1.0,
            "train_seconds": 2.0,
            "reward_queries": 64 * (e + 1),
        }
        if evaluated:
            m.update(
                eval_trained_reward_mean=-2.0 * (1 - cut),
                eval_trained_fidelity=kept,
                eval_heldout_reward_mean=-3.0 * (1 - cut / 2),
            )
        return m

    metrics = [
        epoch(0, 0, 1),
        epoch(1, 0.35, 0.9, False),
        epoch(2, 0.35, 0.9),
        epoch(3, 0, 1, False),
        epoch(4, 0.31, 0.96),
        epoch(5, 0, 1, False),
        epoch(6, 0.32, 0.97),
        epoch(7, 0, 1, False),
    ]
    at = time_to_target.reached(
        metrics
    )  # epoch 2 keeps too little fidelity; 4 and 6 hold it twice in a row
    assert (
        at["epoch"] == 6 and at["seconds"] == 6 * 3.0 and at["queries"] == 6 * 64
    )  # epoch 6's evaluation comes before its sampling
    assert (
        abs(at["cut"] - 0.32) < 1e-12
        and abs(at["kept"] - 0.97) < 1e-12
        and abs(at["heldout_cut"] - 0.16) < 1e-12
    )
    assert time_to_target.reached(metrics[:6]) is None
    # the final weights' evaluation, a row of its own after the last epoch: all the training before it
    final = {
        "epoch": 8,
        "reward_queries": 8 * 64,
        **{k: v for k, v in epoch(8, 0.33, 0.98).items() if k.startswith("eval")},
    }
    assert time_to_target.evaluations([*metrics, final])[-1]["seconds"] == 8 * 3.0
    assert (
        time_to_target.reached([*metrics[:5], final])["epoch"] == 8
    )  # 4 then the final one, in a row
    fast, slow, none = (
        {"reached": True, "seconds": 10},
        {"reached": True, "seconds": 20},
        {"reached": False, "cut": 0.5, "kept": 0.99},
    )
    assert (
        time_to_target.choose({1e-3: slow, 2e-3: fast, 4e-3: none}) == 2e-3
        and time_to_target.choose({1e-3: none}) == 1e-3
    )


def test_time_to_target_tunes_every_recipe_on_as_many_rates_its_own_grid_or_the_ones_given():
    recipes = ["paper", "awm", "nft"]
    grids = time_to_target.grid(argparse.Namespace(recipes=recipes, lrs=None))
    assert grids["awm"] != grids["paper"] != grids["nft"]
    assert len({len(g) for g in grids.values()}) == 1
    tasks = time_to_target.interleaved(recipes, range(len(time_to_target.LRS)), grids)
    assert tasks[:3] == [(r, grids[r][0]) for r in recipes] and len(tasks) == 3 * 4
    given = time_to_target.grid(argparse.Namespace(recipes=recipes, lrs=[1e-3]))
    assert all(g == [1e-3] for g in given.values())


def test_time_to_target_stops_a_run_once_its_target_is_held_and_reuses_it(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        time_to_target, "CUT", -1.0
    )  # any cut: held at the second evaluation, epoch 1
    prompts, eval_prompts = tmp_path / "train.txt", tmp_path / "eval.txt"
    prompts.write_text("a cat\na dog\n")
    eval_prompts.write_text("a cat\na dog\nan owl\n")
    small = (
        f"--model {tiny_pipeline_dir} --prompts {prompts} --eval-prompts {eval_prompts} --eval-samples 3 --samples-per-epoch 8 "
        f"--batch-size 2 --num-steps 2"
    )
    common = [
        "--recipes",
        "group4",
        "--lrs",
        "5e-3",
        "--epochs",
        "30",
        "--eval-every",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--page",
        str(tmp_path / "page.md"),
        "--train-args",
        small,
    ]
    time_to_target.main([*common, "--stage", "tune"])
    tuned = json.loads((tmp_path / "out" / "tune" / "tune.json").read_text())
    assert (
        tuned["group4"]["lr"] == 5e-3
        and tuned["group4"]["settings"]["0.005"]["reached"]
        and tuned["group4"]["settings"]["0.005"]["epoch"] == 1
    )
    run = tmp_path / "out" / "tune" / "group4-lr0.005"
    assert (
        len((run / "metrics.jsonl").read_text().splitlines()) < 30
    )  # stopped, not run to its budget
    # a run with its result.json is reused: the tuning's run stands in for seed 0's, and the final stage only reports
    shutil.copytree(run, tmp_path / "out" / "group4-seed0")
    before = (tmp_path / "out" / "group4-seed0" / "result.json").stat().st_mtime
    time_to_target.main([*common, "--stage", "final", "--seeds", "0"])
    assert (tmp_path / "out" / "group4-seed0" / "result.json").stat().st_mtime == before
    assert (
        "| group4 | 0.005 | 1 of 1 |" in (tmp_path / "out" / "time_to_target.md").read_text()
        and (tmp_path / "out" / "time_to_target.png").is_file()
    )
    page = (tmp_path / "page.md").read_text()  # the table, with the commit and machine it ran on
    assert "<!-- begin time_to_target" in page and "| group4 | `--samples-per-prompt 4" in page
    made_by = "Made by `python benchmarks/time_to_target.py --jobs 2 --recipes group4 --train-args "
    assert made_by in page and "`: commit `" in page


def test_a_run_killed_three_times_at_random_moments_resumes_to_the_straight_runs_outputs(
    tiny_pipeline_dir, tmp_path
):
    flags = (
        f"--model {tiny_pipeline_dir} --epochs 2 --samples-per-epoch 8 --batch-size 2 "
        "--num-steps 3 --prompts simple_animals --eval-every 1 --eval-samples 4 --seed 1"
    ).split()
    began = kill_soak.time.time()
    kill_soak.finish(
        kill_soak.start(tmp_path / "straight", tmp_path / "stack.txt", True, flags),
        tmp_path / "straight",
        flags,
    )
    wall = kill_soak.time.time() - began
    landed, _, rounds = kill_soak.soak(tmp_path, 3, 0, wall, flags)
    straight = same_outputs.written(tmp_path / "straight")
    assert len(landed) == 3 and rounds
    for out in rounds:
        ours = same_outputs.written(out)
        assert all(same_outputs.same(straight[part], ours[part]) for part in straight), out


def test_profile_epoch_puts_every_second_of_an_epoch_in_one_row(tiny_pipeline_dir, tmp_path):
    small = ["--model", str(tiny_pipeline_dir), "--samples-per-epoch", "8", "--batch-size", "2"]
    small += ["--updates-per-epoch", "2", "--num-steps", "2", "--prompts", "simple_animals"]
    keep, page = tmp_path / "profile.json", tmp_path / "speed.md"
    clocked = (torch.Tensor.backward, train.update, machinery.run.Run.log)
    result = profile_epoch.main(
        ["--epochs", "2", "--keep", str(keep), "--page", str(page), "--", *small]
    )
    rows, beyond = profile_epoch.beyond_floor(result)
    # each part's own seconds: none counted twice (a part inside another is taken out of it), so
    # what no part holds, each phase's rest, is never negative
    assert all(value > -1e-3 for key, value in rows.items() if key[1] != "gap"), rows
    assert all(result["seconds"][key] > 0 for key in ("sampling/denoiser", "update/backward"))
    floor = sum(result["floor"].values())
    assert 0 < floor and beyond == pytest.approx(result["epoch_seconds"] - floor, rel=1e-6)
    text = page.read_text()
    assert "<!-- begin profile" in text and "`--model" in text and "epoch / floor" in text
    assert (torch.Tensor.backward, train.update, machinery.run.Run.log) == clocked  # taken off


def test_decode_batch_times_each_chunk_size_in_turn(tiny_pipeline_dir, tmp_path):
    keep, page = tmp_path / "decode.json", tmp_path / "speed.md"
    result = decode_batch.main(
        [
            "--model",
            str(tiny_pipeline_dir),
            "--repeats",
            "3",
            "--keep",
            str(keep),
            "--page",
            str(page),
        ]
    )
    assert {size: len(values) for size, values in result["seconds"].items()} == dict.fromkeys(
        ["64", "32", "16", "8"], 1
    )
    assert "<!-- begin decode_batch" in page.read_text() and json.loads(keep.read_text()) == result


def test_reward_cost_times_each_reward_in_turn(tmp_path):
    keep, page = tmp_path / "cost.json", tmp_path / "rewards.md"
    result = reward_cost.main(
        ["--reduced", "--repeats", "2", "--keep", str(keep), "--page", str(page)]
    )
    names = [case["reward"] for case in result["cases"]]
    ocr = ["ocr"] * 3 + ["ocr --ocr-detect"] * 2  # one at a time, batches of 6 and 64; detection
    assert names == ["jpeg", *ocr, "clipscore", "pickscore"]
    assert all(len(case["seconds"]) == 1 for case in result["cases"])
    assert "<!-- begin reward_cost" in page.read_text() and json.loads(keep.read_text()) == result


def test_flux_memory_counts_on_the_meta_device_and_checkpointing_saves(tmp_path):
    keep, page = tmp_path / "memory.json", tmp_path / "flow.md"
    result = flux_memory.main(
        ["--reduced", "--rank", "4", "--keep", str(keep), "--page", str(page)]
    )
    saved = result["activations"]
    assert result["parameters"]["CLIP ViT-L/14 text encoder"] == 123_060_480  # CLIP-L's text tower
    assert 0 < saved["checkpointed"] < saved["whole"] and result["lora_parameters"] > 0
    assert "<!-- begin flux_memory" in page.read_text() and json.loads(keep.read_text()) == result

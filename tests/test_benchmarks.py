"""The benchmark scripts run end to end in a reduced mode (a smoke test: no timing is asserted)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare  # noqa: E402
import gpu_memory  # noqa: E402
import overhead  # noqa: E402
import train  # noqa: E402


def test_compare_runs_every_algorithm_and_writes_table_and_plot(tiny_pipeline_dir, tmp_path):
    small = f"--model {tiny_pipeline_dir} --samples-per-epoch 8 --batch-size 2 --num-steps 2 --prompts simple_animals --lr 1e-2"
    runs = compare.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path), "--train-args", small])
    assert sorted(runs) == sorted((reward, algo) for reward, algos in compare.COMPARISONS.items() for algo in algos)
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 2 + len(runs) and (tmp_path / "compare.png").is_file()
    # a finished run is reused, not run again
    before = (tmp_path / "jpeg-rwr-seed0" / "metrics.jsonl").stat().st_mtime
    compare.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path), "--train-args", small])
    assert (tmp_path / "jpeg-rwr-seed0" / "metrics.jsonl").stat().st_mtime == before


def test_overhead_replays_exactly_the_counted_unet_calls(tiny_pipeline_dir):
    small = ["--model", str(tiny_pipeline_dir), "--samples-per-epoch", "8", "--batch-size", "2", "--updates-per-epoch", "2",
             "--num-steps", "2", "--prompts", "simple_animals"]
    loader = train.load_pipeline
    result = overhead.main(["--epochs", "2", "--", *small])
    # one counted epoch: 4 batches x 2 steps, sampling and training (every step trained)
    assert result["sampling_calls"] == 8 and result["training_calls"] == 8
    assert 0 < result["overhead_ratio"] < float("inf")
    assert train.load_pipeline is loader  # the instrumentation is undone


def test_gpu_memory_runs_in_reduced_mode_on_the_cpu():
    rows = gpu_memory.main(["--arch", "tiny", "--device", "cpu", "--batch-sizes", "1", "2", "--num-steps", "2"])
    assert [row[0] for row in rows] == [1, 2]
    assert all(peak is None and sampling > 0 and training > 0 for _, peak, sampling, training, _ in rows)

"""The benchmark scripts run end to end in a reduced mode (a smoke test: no timing is asserted)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare  # noqa: E402


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

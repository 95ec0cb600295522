"""How much of a slow served reward's time a run hides behind its sampling. The demo's settings
(the bundled model, 64 images an epoch in 4 batches of 16) for --epochs epochs, with --reward jpeg
in this process against the same JPEG reward served by a server in this benchmark that sleeps
--delay seconds before each answer, the two arms taking turns, each run its own single-threaded
process. The table gives each run's wall time and the served runs' extra time against the server's
own time (requests x delay): with no overlap the extra time would be all of it.

    python benchmarks/served_overlap.py --delay 2 --rounds 2
    python benchmarks/served_overlap.py --keep docs/served/overlap.json --page docs/reward-server.md

With --keep FILE --page PAGE it keeps the runs' seconds, with the commit and machine, and writes the
table into the page; --report writes the page again from the kept file, measuring nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import HTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machinery import serving  # noqa: E402
from page import measured_or_kept, provenance, write_table  # noqa: E402


def slow_server(delay):
    """The JPEG reward, served after delay seconds a request: its URL, and a list of requests."""
    cfg, _ = serving.parse_args(["--reward", "jpeg", "--device", "cpu"])
    jpeg, requests = serving.load(cfg), []

    def reward(images, prompts):
        requests.append(len(prompts))
        time.sleep(delay)
        return jpeg(images, prompts)

    handler = serving.make_handler("jpeg", reward, "cpu", 10**9)
    handler.log_message = lambda *args: None
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", requests


def run(reward, out, epochs):
    """One run: its wall seconds and its metrics' rewards (both arms must agree on them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), "--reward", reward, "--epochs", str(epochs)]
    command += ["--sample-batch-size", "16"]  # 4 batches: one is scored as the next samples
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, [row["reward_mean"] for row in rows]


def measure(args):
    url, requests = slow_server(args.delay)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(args.rounds):
            for arm, reward in (("in-process", "jpeg"), ("served", url)):
                before = len(requests)
                wall, rewards = run(reward, Path(folder) / f"{arm}-{k}", args.epochs)
                served = (len(requests) - before) * args.delay
                runs.append({"arm": arm, "wall": wall, "rewards": rewards, "server": served})
                print(f"{arm:10} round {k}: {wall:6.1f} s", flush=True)
    command = (
        f"python benchmarks/served_overlap.py --delay {args.delay:g} --rounds {args.rounds} "
        f"--epochs {args.epochs}"
    )
    return {"runs": runs, "command": command, **provenance()}


def table(runs):
    local = [r["wall"] for r in runs if r["arm"] == "in-process"]
    served = [r for r in runs if r["arm"] == "served"]
    extra = statistics.median(r["wall"] for r in served) - statistics.median(local)
    asleep = statistics.median(r["server"] for r in served)
    same = all(r["rewards"] == runs[0]["rewards"] for r in runs)
    walls = ", ".join(f"{r['wall']:.1f} s" for r in served)
    return "\n".join(
        [
            "| arm | wall time of each run | the server asleep, a run | extra wall time (medians) |",
            "|---|---|---|---|",
            f"| `--reward jpeg` | {', '.join(f'{w:.1f} s' for w in local)} | - | - |",
            f"| the same, served | {walls} | {asleep:.0f} s | {extra:.1f} s |",
            "",
            f"Every run's rewards {'equal' if same else 'DIFFER between'} the two arms'.",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay", type=float, default=2.0, help="the server's sleep a request")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, taking turns")
    parser.add_argument("--epochs", type=int, default=2, help="epochs a run")
    parser.add_argument("--keep", type=Path, help="keep the results in this JSON file")
    parser.add_argument("--page", type=Path, help="write the table into this page (with --keep)")
    parser.add_argument(
        "--report", action="store_true", help="the page from --keep, measuring nothing"
    )
    args = parser.parse_args(argv)
    if (args.page or args.report) and not args.keep:
        parser.error("--page and --report read the results kept in --keep: give it")
    results = measured_or_kept(args.report, args.keep, lambda: measure(args))
    print(table(results["runs"]))
    if args.page:
        write_table(args.page, "served_overlap", table, results)
    return results


if __name__ == "__main__":
    main()

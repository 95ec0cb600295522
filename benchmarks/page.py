"""A results page in docs/: the prose a person wrote, then the block its benchmark writes from its
result files, which ends with the command that made them, the commit and the machine they ran on.

A benchmark records `provenance()` beside each result when it measures it, and calls
`write_block(page, name, body)` with a body built from its result files, so that the page can be
written again from the files kept in docs/ without measuring anything.
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args):
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def cpu_name():
    try:
        with open("/proc/cpuinfo") as lines:
            names = [
                line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
            ]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def provenance():
    """Today, this checkout's commit ('+changes' if tracked files other than the pages differ from
    it), this machine."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs", ":!*.md")
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit + ("+changes" if changed else ""),
        "machine": f"{os.cpu_count()} CPU cores ({cpu_name()}), {platform.system()}",
    }


def made_by(command, records):
    """One line: the command, and the commit, machine and date of each distinct record (results
    measured before the benchmarks recorded them are said to be so)."""
    records = list(records)
    seen = sorted({(r["commit"], r["machine"], r["date"]) for r in records if "commit" in r})
    where = [f"commit `{c}` on {m}, {d}" for c, m, d in seen]
    missing = sum("commit" not in r for r in records)
    if missing:
        where.append(f"{missing} results from before the benchmark recorded commit and machine")
    return f"Made by `{command}`: {'; '.join(where)}."


def write_block(page, name, body):
    """Put body into page between the markers of name (appended at the end the first time), the
    rest of the page as it was; written aside and renamed, so a page is never half written."""
    page = Path(page)
    begin, end = f"<!-- begin {name}: written by its benchmark -->", f"<!-- end {name} -->"
    text = page.read_text() if page.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    aside = page.with_name(f".{page.name}.{os.getpid()}")
    aside.write_text(text)
    aside.replace(page)


def keep_run(run, kept, also=()):
    """A finished run's result files (metrics, run.json, wall time, settings, and the files named
    in also, where they are) copied into kept, its settings' paths in this checkout written from
    its root: no weights, no samples."""
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "run.json", "wall_seconds.txt", *also):
        if (run / name).is_file():
            shutil.copyfile(run / name, kept / name)
    settings = json.loads((run / "config.json").read_text())
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith(f"{ROOT}/"):
            settings[key] = value.removeprefix(f"{ROOT}/")
    (kept / "config.json").write_text(json.dumps(settings, indent=1) + "\n")


def run_record(run):
    """A run folder's record of its commit, machine and date (run.json; {} for a run made before
    the benchmarks recorded them)."""
    path = Path(run) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_json(path, data):
    """data into the JSON file path, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def measured_or_kept(report, path, measure):
    """With report, the results kept in path; else measure()'s, kept in path when one is given.
    Results are a dict of the runs, the command that made them and its provenance."""
    if report:
        return json.loads(Path(path).read_text())
    results = measure()
    if path:
        save_json(path, results)
    return results


def write_table(page, name, table, results):
    """table(results' runs) into page, with the line that says what made them, where and when."""
    write_block(page, name, f"{table(results['runs'])}\n\n{made_by(results['command'], [results])}")


def parse_with_result_flags(parser, argv):
    """The arguments of a benchmark that measures one result, with --keep (the JSON file it is
    kept in) and --page (the page its table is written into, from the kept result) added."""
    parser.add_argument("--keep", type=Path, help="a JSON file to keep the result in")
    parser.add_argument("--page", type=Path, help="write the kept result's table into this page")
    args = parser.parse_args(argv)
    if args.page and not args.keep:
        parser.error("--page writes the kept result: give --keep too")
    return args


def report(args, name, result, table):
    """result's table printed, the result kept in --keep, and the table with the line on what made
    it written into --page as the block name."""
    print(table(result))
    if args.keep:
        save_json(args.keep, result)
    if args.page:
        write_block(args.page, name, f"{table(result)}\n\n{made_by(result['command'], [result])}")
    return result

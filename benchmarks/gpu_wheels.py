"""The wheels the GPU machine lacks, at the versions this checkout is tested with, for its Python
3.12 on x86-64 Linux: downloaded here into .whl/ (ignored by git), carried to the machine, installed
there before benchmarks/gpu_check.py runs.

    python benchmarks/gpu_wheels.py            # here, where the package index is reachable

The machine has torch, accelerate, safetensors, numpy, pillow and matplotlib, but no diffusers, and
older transformers and huggingface-hub than requirements.txt's; it reaches no package index. The
versions are this virtual environment's (built from requirements.txt), so the machine runs what
the tests ran. The device command then begins with the line this prints.
"""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# requirements.txt's pins it lacks, then what they need that it lacks (huggingface-hub 2's
# httpx2, diffusers' importlib_metadata, and click at the version transformers' typer asks for)
NAMES = ["diffusers", "transformers", "tokenizers", "huggingface-hub", "peft"]
NAMES += ["httpx2", "httpcore2", "truststore", "importlib-metadata", "lazy-importer", "click"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT = 40 * 2**20  # the working tree and the wheels travel together, 64 MiB in all
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;"
)


def main():
    pins = [f"{name}=={version(name)}" for name in NAMES]
    for stale in WHEELS.glob("*.whl"):  # one version of each: two stop the install
        stale.unlink()
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms]
        + ["-d", str(WHEELS), *pins],
        check=True,
    )
    size = sum(w.stat().st_size for w in WHEELS.glob("*.whl"))
    print(f"{len(pins)} wheels, {size / 2**20:.1f} MiB in .whl/: {' '.join(pins)}")
    if size > LIMIT:
        sys.exit(f".whl/ holds {size / 2**20:.1f} MiB, over {LIMIT // 2**20} MiB: carry fewer")
    print(f"the device command begins with (carry .whl):\n{INSTALL}")


if __name__ == "__main__":
    main()

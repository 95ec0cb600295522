"""tutorial.ipynb runs top to bottom (on the CPU: the bundled model), as CI executes it, with a shorter
training than its saved run; its hand-written DDPO_IS epoch ends with the same LoRA weights as
train.update's, bit for bit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORTER = {
    "EPOCHS = 10": "EPOCHS = 1",
    "SAMPLES = 64": "SAMPLES = 8",
}  # the parameters cell; the saved outputs: 10 and 64
KERNEL_FAILED = 3
# Executed in a process of its own, so that the kernel's sockets meet nothing the other tests did to
# this one, and on one thread, so that a busy machine slows it the least. Each cell has 600 s (the
# slowest takes under a minute alone); on a cell's error or timeout the client shuts the kernel down
# and raises. A kernel that dies or never starts is the machine's failure, not the notebook's: exit status 3.
RUN = """
import sys
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

path, root = sys.argv[1:]
notebook = nbformat.read(path, as_version=4)
client = NotebookClient(notebook, timeout=600, startup_timeout=120, kernel_name="python3", resources={"metadata": {"path": root}})
try:
    client.execute()
except DeadKernelError as error:
    print(f"the kernel died: {error}", file=sys.stderr)
    sys.exit(3)
except RuntimeError as error:  # jupyter_client's "Kernel didn't respond in N seconds"; any other error is the notebook's
    if "Kernel didn't respond" not in str(error):
        raise
    print(f"the kernel did not start: {error}", file=sys.stderr)
    sys.exit(3)
nbformat.write(notebook, path)
"""


def execute(notebook, work):
    """The notebook with its outputs, run from the repository's root; one more try if the kernel failed."""
    path, env = work / "tutorial.ipynb", {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        nbformat.write(notebook, path)
        result = subprocess.run(
            [sys.executable, "-c", RUN, str(path), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
        if result.returncode != KERNEL_FAILED:
            break
    else:
        pytest.fail(
            f"the notebook's kernel died or did not start, twice; no cell failed; run this test again, alone if the machine is busy\n"
            f"{result.stderr[-2000:]}"
        )
    assert result.returncode == 0, f"a cell failed or timed out:\n{result.stderr[-4000:]}"
    return nbformat.read(path, as_version=4)


def test_tutorial_runs_top_to_bottom_and_its_hand_written_epoch_equals_train_update(tmp_path):
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    parameters = notebook.cells[1]
    for saved, shorter in SHORTER.items():
        assert saved in parameters.source
        parameters.source = parameters.source.replace(saved, shorter)
    runs = set((ROOT / "runs").glob("tutorial-*"))
    try:
        notebook = execute(notebook, tmp_path)
    finally:  # section 8's run writes into the repository's runs/, as a reader's would: remove it
        for run in set((ROOT / "runs").glob("tutorial-*")) - runs:
            shutil.rmtree(run)
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "8 samples, 4 minibatches of 2" in outputs
    assert "by hand and train.update differ by 0.0e+00" in outputs  # the cell also asserts it
    assert "1 epochs in" in outputs
    assert "a = 0 by hand vs FlowMatchEulerDiscreteScheduler.step: 0.0e+00" in outputs

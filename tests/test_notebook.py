"""tutorial.ipynb runs top to bottom (on the CPU: the bundled model), as CI executes it; its
hand-written DDPO_IS epoch ends with the same LoRA weights as train.update's, bit for bit."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # the short train.main run of section 8: 3 epochs here (the saved notebook: 15), the rest as saved


def execute(notebook):
    """Run every cell in a fresh kernel (from the repository's root); a cell's error raises. A kernel
    that dies or will not start is the machine's failure, not the notebook's: one more try, then a
    clear message."""
    for _ in range(2):
        client = NotebookClient(notebook, timeout=600, startup_timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
        try:
            return client.execute()
        except DeadKernelError as error:
            failure = error
        except RuntimeError as error:  # jupyter_client's "Kernel didn't respond in N seconds"; any other error is the notebook's
            if "Kernel didn't respond" not in str(error):
                raise
            failure = error
    pytest.fail(f"the notebook's kernel died or did not start, twice ({type(failure).__name__}: {failure}); no cell failed; "
                f"run this test again, alone if the machine is busy")


def test_tutorial_runs_top_to_bottom_and_its_hand_written_epoch_equals_train_update():
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    parameters = notebook.cells[1]
    assert "EPOCHS = 15" in parameters.source
    parameters.source = parameters.source.replace("EPOCHS = 15", f"EPOCHS = {EPOCHS}")
    execute(notebook)
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "by hand and train.update differ by 0.0e+00" in outputs  # the cell also asserts it
    assert f"{EPOCHS} epochs in" in outputs

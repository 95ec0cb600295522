"""tutorial.ipynb runs top to bottom (on the CPU: the bundled model), as CI executes it; its
hand-written DDPO_IS epoch ends with the same LoRA weights as train.update's, bit for bit."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_runs_top_to_bottom_and_its_hand_written_epoch_equals_train_update():
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on an error
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "by hand and train.update differ by 0.0e+00" in outputs  # the cell also asserts it
    assert "epochs in" in outputs

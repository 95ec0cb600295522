"""tutorial.ipynb runs top to bottom (on the CPU: the bundled model), as CI executes it."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_runs_top_to_bottom():
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on an error
    assert any("epochs in" in output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))

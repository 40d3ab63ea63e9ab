"""The example notebooks run top to bottom (on the small model, to keep the suite fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_examples_are_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        assert nb.name in readme, f"{nb.name} is missing from examples/README.md"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(notebook, small_model_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("AFT_GRAPH_EXAMPLE_MODEL", str(small_model_dir))
    monkeypatch.setenv("AFT_GRAPH_EXAMPLE_MAX_TOKENS", "48")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]

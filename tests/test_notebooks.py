"""The notebooks run from scratch (nbclient) and are committed with their outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["replay_recorded_traffic.ipynb", "operators_explained.ipynb"]

pytestmark = pytest.mark.timeout(300)


def images(nb: nbformat.NotebookNode) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


@pytest.mark.parametrize(
    ("name", "cwd"),
    [("replay_recorded_traffic.ipynb", NOTEBOOKS), ("operators_explained.ipynb", ROOT)],
    ids=["replay-from-notebooks-dir", "operators-from-repo-root"],
)
def test_notebook_executes_from_scratch(name: str, cwd: Path) -> None:
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb = copy.deepcopy(committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    client = NotebookClient(
        nb, timeout=120, startup_timeout=60, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute()
    except CellExecutionError as exc:  # the message holds the failing cell and its traceback
        pytest.fail(f"{name}: a cell failed:\n{exc}")
    assert images(nb) >= 5, f"{name}: expected its plots, got {images(nb)} images"
    assert images(nb) == images(committed), f"{name}: the committed outputs are stale: re-execute and commit it"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_with_its_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), f"{name}: not executed"
    assert all(output.output_type != "error" for cell in code for output in cell.outputs)
    assert images(nb) >= 5

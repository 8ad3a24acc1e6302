"""The notebooks run from scratch (nbclient) and are committed with their outputs.

The replay notebook reads ``notebooks/data/demo-session.jsonl`` unless ``FACILITATOR_RECORDING``
names another recording (a relative path is taken from the repository root); its committed
outputs must be those of the shipped recordings, so regenerating one means re-executing it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from streams.devtools.replay import load_recording, summarize

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
REPLAY = "replay_recorded_traffic.ipynb"
NAMES = [REPLAY, "operators_explained.ipynb"]
DEMO_RECORDING = NOTEBOOKS / "data" / "demo-session.jsonl"
REAL_CAPTURE = NOTEBOOKS / "data" / "real-facilitator-session.jsonl"
ENV = "FACILITATOR_RECORDING"
WALL_CLOCK = re.compile(r"replayed in [\d.]+ ms")
"""The one output that changes from run to run (the replay notebook times its virtual-time replay)."""

pytestmark = pytest.mark.timeout(300)


def images(nb: nbformat.NotebookNode) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


def texts(nb: nbformat.NotebookNode) -> list[str]:
    """The text outputs of every code cell (printed text, reprs), in order, wall-clock times masked."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            text = output.get("text") if output.output_type == "stream" else output.get("data", {}).get("text/plain")
            if text is not None:
                found.append(WALL_CLOCK.sub("replayed in … ms", "".join(text)))
    return found


def cell_output(nb: nbformat.NotebookNode, cell_id: str) -> str:
    cell = next(cell for cell in nb.cells if cell.get("id") == cell_id)
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    """A copy of the committed notebook, outputs cleared, executed from scratch in ``cwd``."""
    nb = copy.deepcopy(nbformat.read(NOTEBOOKS / name, as_version=4))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    client = NotebookClient(
        nb, timeout=120, startup_timeout=60, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel inherits the environment: a FACILITATOR_RECORDING set in the shell must not leak in."""
    monkeypatch.delenv(ENV, raising=False)


@pytest.mark.usefixtures("no_override")
@pytest.mark.parametrize(
    ("name", "cwd"),
    [(REPLAY, NOTEBOOKS), ("operators_explained.ipynb", ROOT)],
    ids=["replay-from-notebooks-dir", "operators-from-repo-root"],
)
def test_notebook_executes_from_scratch(name: str, cwd: Path) -> None:
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    try:
        nb = execute(name, cwd)
    except CellExecutionError as exc:  # the message holds the failing cell and its traceback
        pytest.fail(f"{name}: a cell failed:\n{exc}")
    assert images(nb) >= 5, f"{name}: expected its plots, got {images(nb)} images"
    stale = f"{name}: the committed outputs are stale (data or code changed): re-execute and commit it"
    assert images(nb) == images(committed), stale
    assert texts(nb) == texts(committed), stale


def test_replay_notebook_is_committed_with_the_outputs_of_the_shipped_recordings() -> None:
    """Cheap staleness check (no kernel): the printed summaries are those of the data files."""
    nb = nbformat.read(NOTEBOOKS / REPLAY, as_version=4)
    loaded = cell_output(nb, "load")
    assert loaded.startswith("recording: notebooks/data/demo-session.jsonl (the default"), (
        f"{REPLAY} was executed on another recording ({ENV} set?): {loaded.splitlines()[:1]}"
    )
    stale = f"{REPLAY}: its outputs do not match %s: re-execute it and commit it"
    assert summarize(load_recording(DEMO_RECORDING)).render() in loaded, stale % DEMO_RECORDING.name
    assert summarize(load_recording(REAL_CAPTURE)).render() in cell_output(nb, "real"), stale % REAL_CAPTURE.name


@pytest.mark.parametrize(
    "where",
    ["relative-to-repo-root", "absolute-header-only"],
)
def test_replay_notebook_reads_the_recording_named_by_the_environment(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "relative-to-repo-root":
        # Run from notebooks/: the relative path only resolves against the repository root.
        value, path, cwd = str(REAL_CAPTURE.relative_to(ROOT)), REAL_CAPTURE, NOTEBOOKS
    else:  # a recording with a header and nothing else (a recorder stopped at once) still runs
        path = tmp_path / "header-only.jsonl"
        path.write_text('{"format": "facilitator-capture", "version": 1}\n')
        value, cwd = str(path), ROOT
    monkeypatch.setenv(ENV, value)
    try:
        nb = execute(REPLAY, cwd)
    except CellExecutionError as exc:
        pytest.fail(f"{REPLAY} with {ENV}={value}: a cell failed:\n{exc}")
    loaded = cell_output(nb, "load")
    assert loaded.startswith(f"recording: {value} (from {ENV})"), loaded[:200]
    assert summarize(load_recording(path)).render() in loaded
    assert "demo-session.jsonl" not in "".join(texts(nb)), "the demo recording was read as well"
    assert images(nb) == images(nbformat.read(NOTEBOOKS / REPLAY, as_version=4))


def test_replay_notebook_names_a_missing_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "recordings/no-such-recording.jsonl")
    with pytest.raises(CellExecutionError) as failed:
        execute(REPLAY, ROOT)
    message = str(failed.value)
    assert "FileNotFoundError" in message
    assert f"{ENV}='recordings/no-such-recording.jsonl'" in message
    assert str(ROOT / "recordings" / "no-such-recording.jsonl") in message


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_with_its_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), f"{name}: not executed"
    assert all(output.output_type != "error" for cell in code for output in cell.outputs)
    assert images(nb) >= 5

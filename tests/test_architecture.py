"""The architecture a newcomer reads from the tree is the one the code has: layers, no cycles, nothing outside.

The contracts live in pyproject.toml (``[tool.importlinter]``); import-linter checks them here, in
``make test``. The README's "How it is built" section explains them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden_import", "contract"),
    [
        ("streams/protocol.py", "import streams.client", "layered"),
        ("streams/client.py", "import streams.cli", "never imports the CLI"),
        ("operators/hold.py", "import streams.events", "operators imports nothing of the project"),
        ("streams/dispatchers/celery/__init__.py", "import streams.message_manager", "Celery dispatcher sees only"),
    ],
)
def test_a_forbidden_import_breaks_the_contracts(
    tmp_path: Path, module: str, forbidden_import: str, contract: str
) -> None:
    for name in ("streams", "operators"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{forbidden_import}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout.replace("\n", " ")
    assert "BROKEN" in result.stdout


def _repo_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def test_no_file_points_outside_the_repository() -> None:
    """A user's clone holds only the repository: docs, code, tests and notebooks refer to nothing beside it."""
    shared = "sha" + "red"  # spelled apart so that this file does not match itself
    outside = re.compile(rf"(\.\./|/work/){shared}\b|\b{shared}/(captures|PROTOCOL|DESIGN|FIELD-NOTES)")
    offenders = [
        str(path.relative_to(ROOT))
        for path in _repo_files()
        if path.suffix not in {".png", ".jpg"} and outside.search(path.read_text(errors="replace"))
    ]
    assert offenders == []

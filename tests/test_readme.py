"""The README's library example is real code: it compiles and names the public API as it is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import streams
import streams.protocol

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_library_example_compiles_and_imports_what_exists() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 20, "the embedding example stays under 20 lines"
    tree = ast.parse(example)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("streams", "streams.protocol"):
            module = streams if node.module == "streams" else streams.protocol
            for alias in node.names:
                assert hasattr(module, alias.name), f"README imports {node.module}.{alias.name}, which does not exist"

"""The package reads like a short script: no function in ftkit/ is longer than MAX_LINES lines (its `def` line to
its last line, docstring and comments included)."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "ftkit"
MAX_LINES = 60


def long_functions(path, root=REPO) -> list[str]:
    """"file:line name (n lines)" for each function in `path` longer than MAX_LINES."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_package_is_longer_than_sixty_lines():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in long_functions(path)]
    assert not found, "\n".join(found)


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x = {i}" for i in range(MAX_LINES))
    path = tmp_path / "module.py"
    path.write_text(f"def short():\n    return 1\n\n\ndef just_fits():\n{body[: body.rindex(chr(10))]}\n\n\n"
                    f"def too_long():\n{body}\n")
    assert long_functions(path, tmp_path) == [f"module.py:{MAX_LINES + 7} too_long ({MAX_LINES + 1} lines)"]

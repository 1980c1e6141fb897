"""ruff (lint and format) and mypy over the repository, with the configuration in pyproject.toml.

The tools come from the environment that runs the tests (scripts/install.sh installs them next to
pytest); a missing tool fails, as every missing tool does in this suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def _run_tool(name: str, *args: str, timeout: float = 600) -> None:
    """Run ``name args...`` from this interpreter's bin folder in the repository root; fail with its output."""
    tool = Path(sys.executable).parent / name
    if not tool.exists():
        pytest.fail(f"{tool} is missing: scripts/install.sh installs it")
    result = subprocess.run([str(tool), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    code, output = result.returncode, (result.stdout + result.stderr).strip()
    assert code == 0, f"{' '.join([name, *args])} exited with {code}:\n{output}"


def test_ruff_lint_is_clean() -> None:
    _run_tool("ruff", "check", "--output-format=concise", ".")


def test_ruff_format_leaves_every_file_as_it_is() -> None:
    _run_tool("ruff", "format", "--check", ".")


def test_mypy_is_clean() -> None:
    # Which files mypy checks is set in pyproject.toml ([tool.mypy] files).
    _run_tool("mypy")


# Every function of the package stays readable in one screen (declarative tables are module constants,
# not functions, so the rule needs no exception).
FUNCTION_LINES = 80


def test_functions_stay_short() -> None:
    import ast

    long = []
    for path in sorted((REPO_ROOT / "hpc_localsgd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []

"""The package's layering holds: import-linter's contracts in pyproject.toml pass, and they do break
when an upward import or a stray communication library comes back (imports inside functions included).

A missing import-linter fails these tests: the layering is enforced, not hoped for.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "hpc_localsgd"


def lint_imports_program() -> str:
    """``lint-imports`` of this interpreter's environment, else the one on PATH; a missing one fails the test."""
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install import-linter (scripts/install.sh installs it)")
    return found


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the package under ``root`` with ``root``'s pyproject.toml, and nothing else on the path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [lint_imports_program(), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append_function(module: Path, body: str) -> None:
    """Add a function whose body holds an import: imports run lazily must count too."""
    module.write_text(module.read_text() + f"\n\ndef _added_by_the_test() -> None:\n    {body}\n")


def test_the_contracts_hold() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path: Path) -> None:
    root = copy_of_the_package(tmp_path)
    append_function(root / PACKAGE / "comm" / "agree.py", "from ..train import loop  # noqa: F401")
    done = lint_imports(root)
    assert done.returncode != 0
    assert "Data-flow layers: a package imports only from the layers below it BROKEN" in done.stdout
    assert "hpc_localsgd.comm.agree -> hpc_localsgd.train.loop" in done.stdout


def test_a_communication_library_outside_comm_breaks_its_contract(tmp_path: Path) -> None:
    root = copy_of_the_package(tmp_path)
    append_function(root / PACKAGE / "train" / "resume.py", "import mpi4py.MPI  # noqa: F401")
    done = lint_imports(root)
    assert done.returncode != 0
    assert "Only the communicators import horovod and mpi4py BROKEN" in done.stdout
    assert "hpc_localsgd.train.resume -> mpi4py" in done.stdout


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (``from torch import distributed`` gives torch.distributed)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_comm_and_the_ddp_baseline_import_torch_distributed() -> None:
    # import-linter forbids whole external packages only, and torch is everywhere.
    allowed = {REPO / PACKAGE / "bench" / "baselines.py"}  # the bench's plain DDP baseline
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / PACKAGE).rglob("*.py"))
        if path.relative_to(REPO / PACKAGE).parts[0] != "comm"
        and path not in allowed
        and any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in imported_names(path))
    ]
    assert offenders == []


def test_the_scan_sees_torch_distributed_however_imported(tmp_path: Path) -> None:
    for line in (
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
    ):
        module = tmp_path / "module.py"
        module.write_text(f"def f():\n    {line}\n")
        assert "torch.distributed" in imported_names(module)


def module_cycles() -> list[set[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected components)."""
    import grimp  # installed with import-linter

    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    order: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        order[module] = lowest[module] = len(order)
        stack.append(module)
        for imported in imports[module]:
            if imported not in order:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in stack:
                lowest[module] = min(lowest[module], order[imported])
        if lowest[module] == order[module]:
            component = {stack.pop()}
            while module not in component:
                component.add(stack.pop())
            if len(component) > 1:
                cycles.append(component)

    for module in sorted(imports):
        if module not in order:
            visit(module)
    return cycles


def test_no_new_import_cycle() -> None:
    # Layers say nothing about modules of one package importing each other in a circle.
    assert [sorted(cycle) for cycle in module_cycles()] == []

"""Test tiers: every test gets markers from where it lives, so that ``-m`` picks a tier.

    mpi      runs ranks under mpirun (everything in tests/mpi)
    slurm    needs the private Slurm cluster (tests/slurm)
    slownet  creates network namespaces with a rate-limited link (test_slownet.py)
    lint     ruff, mypy and import-linter over the repository
    slow     the files that take longest (``SLOW_FILES``)
    quick    every test with none of slow, slurm, slownet and lint: the unit tests and the core
             algorithm cases and collectives on real ranks

``./scripts/test.sh`` runs every tier (CI); ``./scripts/test.sh -m quick`` the quick one, for the
minutes you wait while changing one module (docs/testing.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Markers that keep a test out of the quick tier.
NOT_QUICK = {"slow", "slurm", "slownet", "lint"}
LINT_FILES = {"test_static_checks.py", "test_layering.py"}
# Files of the whole suite's longest (docs/testing.md gives their times on 2 cores).
SLOW_FILES = {
    "mpi/test_bench.py",
    "mpi/test_checkpoints.py",
    "mpi/test_device_settings.py",
    "mpi/test_drift.py",
    "mpi/test_failures.py",
    "mpi/test_worker_loss.py",
    "mpi/test_horovod_names.py",
    "mpi/test_instruction_sets.py",
    "mpi/test_launchers.py",
    "mpi/test_simulated.py",
    "mpi/test_stall.py",
    "mpi/test_study.py",
    "mpi/test_worker_groups.py",
    "mpi/test_bad_input.py",
    "mpi/test_cli.py",
    "mpi/test_collectives.py",
    "mpi/test_language.py",
}


def tier_markers(relative: str) -> list[str]:
    """The markers of the test file at ``relative`` (to tests/, with forward slashes)."""
    folder, name = relative.split("/", 1) if "/" in relative else ("", relative)
    markers = []
    if folder == "mpi":
        markers.append("mpi")
    if folder == "slurm":
        markers.append("slurm")
    if name == "test_slownet.py":
        markers.append("slownet")
    if name in LINT_FILES:
        markers.append("lint")
    if relative in SLOW_FILES:
        markers.append("slow")
    if not NOT_QUICK.intersection(markers):
        markers.append("quick")
    return markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        for marker in tier_markers(relative):
            item.add_marker(marker)

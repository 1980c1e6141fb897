"""The equivalence tests once more with this process's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``): the setting under which the simulated backend's float32 comparison with real
ranks failed on CPUs without AVX-512, reproduced on one with it. Their ranks take the baseline kernels
(``cases.BASELINE_KERNELS``) as always, so this run crosses the AVX2 kernels with the baseline ones. A
kernel change in torch that moved the two paths apart beyond a tolerance fails here, whatever CPU CI has."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import MPI_TEST_ENV, REPO_ROOT
from tests.mpi.test_simulated import CASES_BY_RANKS

AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
EQUIVALENCE_TESTS = [
    "tests/mpi/test_simulated.py",
    "tests/mpi/test_worker_groups.py::test_the_simulated_backend_reproduces_a_hierarchical_run",
]


def test_the_simulated_backend_matches_ranks_with_kernels_capped_at_avx2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EQUIVALENCE_TESTS],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, **MPI_TEST_ENV, **AVX2_KERNELS},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Every case ran (none skipped): one per simulated case of test_simulated.py, and the hierarchical run.
    expected = sum(len(cases) for cases in CASES_BY_RANKS.values()) + 1
    assert f"{expected} passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]

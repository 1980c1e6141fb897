"""Helpers shared by the test suites: launching a program under ``mpirun`` without ever hanging.

Import as ``from tests.helpers import run_mpi, mpirun_available`` (``tests`` is a package).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Open MPI refuses root without both variables (containers, CI). Its shared-memory transport's
# single-copy mechanism (CMA) needs ptrace rights that containers usually withhold.
MPI_TEST_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
}


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def _session_members(session_id: int) -> list[int]:
    """Processes of a session. ``mpirun`` puts each rank in its own process group, so the
    session (which ranks keep) is what reaches all of them."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    members.append(int(entry))
            except OSError:  # exited meanwhile
                pass
    return members


def kill_session(session_id: int) -> None:
    for pid in _session_members(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run_mpi(
    np: int, argv: list[str], timeout: float = 180, env: Mapping[str, str | None] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """``mpirun -np <np> --oversubscribe <argv>`` with its output captured; fails the test on timeout.

    An ``argv`` starting with ``"python"`` runs this test session's interpreter. The repository
    root is put first on PYTHONPATH so the ranks import this checkout of ``hpc_localsgd``.
    ``env`` adds to (and overrides) this process's environment; a ``None`` value removes that
    variable. On timeout every process the run started is killed and the test fails with
    everything the ranks printed.
    """
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    full_env = {**os.environ, **MPI_TEST_ENV}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    command = ["mpirun", "-np", str(np), "--oversubscribe", *argv]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd or str(REPO_ROOT),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process.pid)  # the session id is mpirun's pid (start_new_session)
        stdout, stderr = process.communicate(timeout=30)
        timed_out = True
    except BaseException:  # e.g. Ctrl-C in pytest: leave no ranks behind
        kill_session(process.pid)
        raise
    else:
        timed_out = False
    if timed_out:  # failed outside the except clause, so the report is not chained to TimeoutExpired
        pytest.fail(
            f"{' '.join(command)} did not finish within {timeout:.0f} s and was killed\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_gpu_check(out: Path, checks: str, **env: str) -> subprocess.CompletedProcess:
    """``scripts/gpu-check.sh OUT`` with only ``checks`` (its CHECKS), this session's interpreter and no GPU
    visible (its CPU fallback); ``env`` adds to the environment."""
    full_env = {**os.environ, **MPI_TEST_ENV, "PYTHON": sys.executable, "CHECKS": checks, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu-check.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**full_env, **env},
        cwd=REPO_ROOT,
        timeout=300,
    )

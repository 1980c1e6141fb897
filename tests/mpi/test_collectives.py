"""Each backend's collectives under ``mpirun -np 2`` (one launcher invocation per backend).

The checks themselves run inside ``collectives_driver.py`` on every rank; this file launches it
and reads its verdict. Horovod is part of the install (scripts/install.sh builds it), so a
missing Horovod fails here rather than being skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import MPI_TEST_ENV, REPO_ROOT, mpirun_available, run_mpi

DRIVER = str(REPO_ROOT / "tests" / "mpi" / "collectives_driver.py")
RANKS = 2
# The torch backend must find its rendezvous over MPI here, not from a stray outer MASTER_ADDR.
WITHOUT_MASTER = {"MASTER_ADDR": None, "MASTER_PORT": None}


@pytest.fixture(autouse=True)
def _require_mpirun() -> None:
    if not mpirun_available():
        pytest.fail("mpirun is not on PATH; scripts/install.sh installs Open MPI")


def report(done: subprocess.CompletedProcess) -> str:
    return f"exit code {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"


def assert_every_rank_ok(done: subprocess.CompletedProcess, backend: str) -> None:
    assert done.returncode == 0, report(done)
    for rank in range(RANKS):
        assert f"OK {backend} rank {rank} of {RANKS}" in done.stdout, report(done)


@pytest.mark.parametrize("backend", ["mpi", "torch", "horovod"])
def test_backend_collectives(backend: str) -> None:
    done = run_mpi(RANKS, ["python", DRIVER, "--backend", backend], timeout=120, env=WITHOUT_MASTER)
    assert_every_rank_ok(done, backend)


def test_torch_backend_with_master_address_and_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_mpi(
        RANKS,
        ["python", DRIVER, "--backend", "torch"],
        timeout=120,
        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
    )
    assert_every_rank_ok(done, "torch")


def test_auto_under_mpirun_picks_horovod() -> None:
    done = run_mpi(RANKS, ["python", DRIVER, "--backend", "auto"], timeout=120, env=WITHOUT_MASTER)
    assert_every_rank_ok(done, "horovod")


SINGLE_MISMATCH = (
    f"hpc-localsgd: error: the launcher (openmpi) started {RANKS} ranks but comm.backend is "
    "'single'; use comm.backend=auto, horovod, mpi or torch"
)


def test_single_under_mpirun_stops_every_rank_with_one_line() -> None:
    # mpirun kills the other ranks as soon as one fails, and with that turned off it reports 0
    # whatever the ranks returned; so each rank's shell prints its exit status itself.
    shell = '"$0" "$@"; echo "exit status $?"'
    done = run_mpi(
        RANKS,
        ["sh", "-c", shell, sys.executable, DRIVER, "--backend", "single"],
        timeout=120,
        env={"OMPI_MCA_orte_abort_on_non_zero_status": "0"},
    )
    assert done.stdout.splitlines() == ["exit status 2"] * RANKS, report(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert errors == [SINGLE_MISMATCH] * RANKS, report(done)
    assert "Traceback" not in done.stdout + done.stderr, report(done)


def test_single_under_mpirun_ends_the_job_with_exit_code_2() -> None:
    done = run_mpi(RANKS, ["python", DRIVER, "--backend", "single"], timeout=120)
    assert done.returncode == 2, report(done)
    assert SINGLE_MISMATCH in done.stderr.splitlines(), report(done)
    assert "Traceback" not in done.stdout + done.stderr, report(done)


@pytest.mark.parametrize("backend", ["mpi", "horovod", "torch"])
def test_a_backend_that_sees_fewer_ranks_than_the_launcher_stops_with_one_line(backend: str) -> None:
    # What `srun` without PMI support looks like: Slurm announces 2 tasks, MPI starts as a singleton.
    fake_srun = {
        **MPI_TEST_ENV,
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "2",
        "PYTHONPATH": str(REPO_ROOT),
    }
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MASTER_"))
    }
    done = subprocess.run(
        [sys.executable, DRIVER, "--backend", backend],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **fake_srun},
        cwd=str(REPO_ROOT),
    )
    assert done.returncode == 2, report(done)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-localsgd: error: the launcher (slurm) "), report(done)
    assert "srun --mpi=pmix" in lines[0] and "Traceback" not in done.stdout, report(done)

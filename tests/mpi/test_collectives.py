"""Each backend's collectives under ``mpirun -np 2`` (one launcher invocation per backend), and its
groups of ranks (``split``) under ``mpirun -np 4``.

The checks themselves run inside ``collectives_driver.py`` on every rank; this file launches it
and reads its verdict. Horovod is part of the install (scripts/install.sh builds it), so a
missing Horovod fails here rather than being skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_localsgd.io.metrics import read_metrics
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, mpirun_available, run_mpi
from tests.mpi.cases import BASE
from tests.mpi.test_cli import cli, empty_config, sets

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


def assert_every_rank_ok(done: subprocess.CompletedProcess, backend: str, ranks: int = RANKS) -> None:
    assert done.returncode == 0, report(done)
    for rank in range(ranks):
        assert f"OK {backend} rank {rank} of {ranks}" in done.stdout, report(done)


# The mpi backend twice: polled (comm.mpi_polling=true, with Open MPI yielding while idle) its communication
# thread tests non-blocking allgathers and all-to-alls every millisecond, and runs allreduces of 1 MiB or more
# as two such exchanges; left to auto on one node, it waits in the blocking calls. Both must give the
# expected bits.
BACKENDS = [("mpi", "1"), ("mpi", "0"), ("torch", None), ("horovod", None)]
POLLED = "byte exchanges and allreduces from 1 MiB tested every 1 ms"


def run_driver(ranks: int, backend: str, yields: str | None, *flags: str) -> subprocess.CompletedProcess:
    env = {**WITHOUT_MASTER, "OMPI_MCA_mpi_yield_when_idle": yields}
    polling = ["--mpi-polling", "true"] if yields == "1" else []
    done = run_mpi(ranks, ["python", DRIVER, "--backend", backend, *polling, *flags], timeout=180, env=env)
    assert_every_rank_ok(done, backend, ranks=ranks)
    if backend == "mpi":
        assert done.stdout.count(POLLED) == (ranks if yields == "1" else 0), report(done)
    return done


def test_auto_polls_no_collective_whose_ranks_share_this_node() -> None:
    # Open MPI yields while idle (a fully subscribed node), but every rank is on this node: the copies
    # through shared memory are the transfer, so the world and its groups wait in the blocking calls.
    env = {**WITHOUT_MASTER, "OMPI_MCA_mpi_yield_when_idle": "1"}
    done = run_mpi(GROUP_RANKS, ["python", DRIVER, "--backend", "mpi", "--groups"], timeout=180, env=env)
    assert_every_rank_ok(done, "mpi", GROUP_RANKS)
    assert POLLED not in done.stdout and "a communication thread" in done.stdout, report(done)


@pytest.mark.parametrize(("backend", "yields"), BACKENDS)
def test_backend_collectives(backend: str, yields: str | None) -> None:
    run_driver(RANKS, backend, yields)


@pytest.mark.parametrize(("backend", "yields"), BACKENDS)
def test_compressed_average_agrees_with_the_reference_on_every_rank(backend: str, yields: str | None) -> None:
    # Every codec, with and without error feedback, three syncs: bit for bit the numpy reference
    # (tests/compression_reference.py), the same average on every rank (collectives_driver.check_compressed_average).
    run_driver(RANKS, backend, yields, "--compression")


@pytest.mark.parametrize(("backend", "yields"), BACKENDS)
def test_two_phase_compressed_average_on_four_ranks(backend: str, yields: str | None) -> None:
    # Among 4 ranks a compressed average is two-phase: an all-to-all of encoded chunks, each rank's chunk
    # summed in fp32 and re-encoded (with its own error feedback), an allgather. Bit for bit the reference.
    run_driver(4, backend, yields, "--compression")


def test_compressed_average_on_mpi_without_thread_multiple() -> None:
    # No communication thread: the allgather is an Iallgather request.
    done = run_mpi(
        RANKS,
        ["python", DRIVER, "--backend", "mpi", "--compression"],
        timeout=120,
        env={"MPI4PY_RC_THREAD_LEVEL": "serialized"},
    )
    assert_every_rank_ok(done, "mpi")


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


GROUP_RANKS = 4


@pytest.mark.parametrize(("backend", "yields"), BACKENDS)
def test_groups_of_ranks(backend: str, yields: str | None) -> None:
    # Groups of 2, of 4 (the world) and of 1: exact sums over the group, broadcasts from a rank of the
    # group, and group allreduces in flight together with the world's (collectives_driver.check_groups);
    # polled, the world's large sums are in rank order among 4 (collectives_driver.check_sum_in_rank_order).
    run_driver(GROUP_RANKS, backend, yields, "--groups")


def test_groups_of_ranks_on_mpi_without_thread_multiple() -> None:
    # Without MPI_THREAD_MULTIPLE there is no communication thread: groups use Iallreduce directly.
    done = run_mpi(
        GROUP_RANKS,
        ["python", DRIVER, "--backend", "mpi", "--groups"],
        timeout=180,
        env={"MPI4PY_RC_THREAD_LEVEL": "serialized"},
    )
    assert_every_rank_ok(done, "mpi", GROUP_RANKS)


def run_each_rank_reporting_its_exit_status(argv: list[str]) -> subprocess.CompletedProcess:
    """As ``test_single_under_mpirun_stops_every_rank_with_one_line``: each rank's shell prints its exit status."""
    shell = '"$0" "$@"; echo "exit status $?"'
    return run_mpi(
        GROUP_RANKS,
        ["sh", "-c", shell, sys.executable, DRIVER, *argv],
        timeout=120,
        env={**WITHOUT_MASTER, "OMPI_MCA_orte_abort_on_non_zero_status": "0"},
    )


def assert_one_line_and_status_2_on_every_rank(done: subprocess.CompletedProcess, line: str) -> None:
    assert done.stdout.splitlines() == ["exit status 2"] * GROUP_RANKS, report(done)
    errors = [text for text in done.stderr.splitlines() if text.startswith("hpc-localsgd: error:")]
    assert errors == [line] * GROUP_RANKS, report(done)
    assert "Traceback" not in done.stdout + done.stderr, report(done)


@pytest.mark.parametrize("backend", ["mpi", "torch", "horovod"])
def test_a_group_size_that_does_not_divide_the_world_stops_every_rank_with_one_line(backend: str) -> None:
    done = run_each_rank_reporting_its_exit_status(["--backend", backend, "--split", "3"])
    assert_one_line_and_status_2_on_every_rank(
        done,
        "hpc-localsgd: error: cannot split a communicator of 4 ranks into groups of 3 ranks: "
        "the group size must be a positive divisor of 4",
    )


def test_horovod_refuses_a_group_size_not_registered_at_init() -> None:
    done = run_each_rank_reporting_its_exit_status(["--backend", "horovod", "--split", "2", "--group-sizes", ""])
    assert_one_line_and_status_2_on_every_rank(
        done,
        "hpc-localsgd: error: the horovod backend has no process sets for groups of 2 ranks (registered: none); "
        "pass group_sizes=[2, ...] to make_communicator, which registers them at hvd.init",
    )


@pytest.mark.parametrize(
    ("backend", "env"),
    [("mpi", {}), ("mpi", {"MPI4PY_RC_THREAD_LEVEL": "serialized"}), ("torch", {}), ("horovod", {})],
    ids=["mpi", "mpi-without-thread-multiple", "torch", "horovod"],
)
def test_communicators_across_groups_of_ranks(backend: str, env: dict[str, str]) -> None:
    # Across groups of 2 in a world of 4 (ranks 0, 2 and 1, 3): exact sums, averages and broadcasts, and an
    # allreduce inside the group of 2 started while one across is in flight (collectives_driver.check_across).
    done = run_mpi(
        GROUP_RANKS, ["python", DRIVER, "--backend", backend, "--across"], timeout=180, env={**WITHOUT_MASTER, **env}
    )
    assert_every_rank_ok(done, backend, GROUP_RANKS)


@pytest.mark.parametrize("backend", ["mpi", "torch", "horovod"])
def test_a_size_across_that_does_not_divide_the_world_stops_every_rank_with_one_line(backend: str) -> None:
    done = run_each_rank_reporting_its_exit_status(["--backend", backend, "--split-across", "3"])
    assert_one_line_and_status_2_on_every_rank(
        done,
        "hpc-localsgd: error: cannot split a communicator of 4 ranks across groups of 3 ranks: "
        "the group size must be a positive divisor of 4",
    )


def test_horovod_refuses_a_size_across_not_registered_at_init() -> None:
    done = run_each_rank_reporting_its_exit_status(
        ["--backend", "horovod", "--split-across", "2", "--across-sizes", ""]
    )
    assert_one_line_and_status_2_on_every_rank(
        done,
        "hpc-localsgd: error: the horovod backend has no process sets across groups of 2 ranks (registered: none); "
        "pass across_sizes=[2, ...] to make_communicator, which registers them at hvd.init",
    )


@pytest.mark.parametrize("delay", [0, 1], ids=["blocking-sync", "sync-overlapped-by-1"])
def test_polled_allreduces_train_to_the_bits_of_blocking_ones(tmp_path: Path, delay: int) -> None:
    # A model whose flat parameters pass 1 MiB (an MLP of 4096 hidden units: 278 k parameters), so that with
    # Open MPI yielding the model averages go as the two polled exchanges; between 2 ranks their sum is the
    # blocking allreduce's a + b, so both runs must give the same losses and final test loss, bit for bit.
    overrides = [
        *BASE,
        "model.name=mlp",
        "model.width=4096",
        "algorithm.method=local_sgd",
        "algorithm.sync_period=2",
        f"algorithm.sync_delay={delay}",
        "comm.backend=mpi",
    ]
    results = {}
    for yields in ("1", "0"):
        run_dir = tmp_path / f"yields{yields}"
        polling = ["comm.mpi_polling=true"] if yields == "1" else []
        argv = cli("train", *sets([*overrides, *polling]), "--run-dir", str(run_dir), empty_config(tmp_path))
        done = run_mpi(RANKS, argv, timeout=300, env={"OMPI_MCA_mpi_yield_when_idle": yields})
        assert done.returncode == 0, report(done)
        assert (POLLED in done.stdout.splitlines()[0]) == (yields == "1"), report(done)
        results[yields] = read_metrics(run_dir / "metrics.h5")
    polled, blocking = results["1"], results["0"]
    assert polled["steps"]["synced"].sum() > 0
    np.testing.assert_array_equal(polled["steps"]["loss"], blocking["steps"]["loss"])
    np.testing.assert_array_equal(polled["evals"]["test_loss"], blocking["evals"]["test_loss"])

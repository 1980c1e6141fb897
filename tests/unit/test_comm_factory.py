"""``make_communicator``: backend choice, one-line errors, and the launcher cross-check, in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hpc_localsgd.comm as comm_package
from hpc_localsgd.comm import SingleCommunicator, ThreadGroup, check_world, make_communicator, resolve_backend
from hpc_localsgd.comm.torch_dist import rendezvous_address
from hpc_localsgd.errors import BackendUnavailable, ConfigError, LauncherMismatch
from hpc_localsgd.launcher.env import LaunchEnvironment, WorldLayout

CPU = torch.device("cpu")
ALONE = LaunchEnvironment("none", WorldLayout(0, 1, 0, 1, 0, 1))
OPENMPI_TWO = LaunchEnvironment("openmpi", WorldLayout(1, 2, 1, 2, 0, 1))
TORCHRUN_TWO = LaunchEnvironment("torchrun", WorldLayout(1, 2, 1, 2, 0, 1))


def assert_one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


def test_importing_the_package_loads_no_communication_library() -> None:
    code = (
        "import sys, hpc_localsgd.comm, hpc_localsgd.launcher.env; "
        "print([m for m in sys.modules if m.split('.')[0] in ('horovod', 'mpi4py')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_auto_alone_is_single() -> None:
    communicator = make_communicator("auto", ALONE, CPU)
    assert isinstance(communicator, SingleCommunicator)
    buffer = torch.arange(4.0)
    communicator.allreduce_(buffer)
    communicator.broadcast_(buffer, root=0)
    communicator.barrier()
    assert torch.equal(buffer, torch.arange(4.0))


def test_auto_prefers_horovod_then_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm_package, "_horovod_import_error", lambda: None)
    assert resolve_backend("auto", OPENMPI_TWO) == "horovod"
    monkeypatch.setattr(comm_package, "_horovod_import_error", lambda: "No module named 'horovod'")
    assert resolve_backend("auto", OPENMPI_TWO) == "mpi"
    assert resolve_backend("auto", TORCHRUN_TWO) == "torch"  # torchrun has set up the rendezvous
    assert resolve_backend("mpi", ALONE) == "mpi"  # explicit choices are kept


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        make_communicator("nccl", ALONE, CPU)
    assert assert_one_line(raised.value).startswith("comm.backend is 'nccl'")


def test_single_under_a_multi_rank_launcher_is_a_mismatch() -> None:
    with pytest.raises(LauncherMismatch) as raised:
        make_communicator("single", OPENMPI_TWO, CPU)
    assert assert_one_line(raised.value) == (
        "the launcher (openmpi) started 2 ranks but comm.backend is 'single'; "
        "use comm.backend=auto, horovod, mpi or torch"
    )


def test_missing_horovod_is_one_line_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm_package, "_horovod_import_error", lambda: "No module named 'horovod'")
    with pytest.raises(BackendUnavailable) as raised:
        make_communicator("horovod", OPENMPI_TWO, CPU)
    assert assert_one_line(raised.value) == (
        "comm.backend is 'horovod' but horovod.torch cannot be imported: No module named 'horovod'; "
        "build it with scripts/install.sh or use comm.backend=mpi"
    )


class _BackendSeeingOneRank(SingleCommunicator):
    """What mpi4py built against another MPI reports under mpirun: a world of one."""

    name = "mpi"


def test_a_backend_seeing_another_world_is_a_mismatch() -> None:
    with pytest.raises(LauncherMismatch) as raised:
        check_world(_BackendSeeingOneRank(), OPENMPI_TWO)
    assert assert_one_line(raised.value).startswith(
        "the launcher (openmpi) started 2 ranks but the mpi backend "
        "sees 1: mpi4py is probably built against another MPI"
    )


def test_a_backend_with_another_rank_is_a_mismatch() -> None:
    rank_0_of_2, rank_1_of_2 = ThreadGroup(2).communicators
    check_world(rank_1_of_2, OPENMPI_TWO)  # agreeing worlds pass
    with pytest.raises(LauncherMismatch) as raised:
        check_world(rank_0_of_2, OPENMPI_TWO)
    assert assert_one_line(raised.value).startswith(
        "the launcher (openmpi) says this is rank 1 but the threads backend says 0"
    )


def test_torch_rendezvous_from_master_variables() -> None:
    layout = OPENMPI_TWO.layout
    assert rendezvous_address(layout, "torchrun", {"MASTER_ADDR": "node3", "MASTER_PORT": "29400"}) == ("node3", 29400)
    for env in ({"MASTER_ADDR": "node3"}, {"MASTER_PORT": "29400"}, {"MASTER_ADDR": "node3", "MASTER_PORT": "x"}):
        with pytest.raises(BackendUnavailable) as raised:
            rendezvous_address(layout, "torchrun", env)
        assert "MASTER_" in assert_one_line(raised.value)


@pytest.mark.parametrize(
    "method,configured,environment,expected",
    [
        ("allreduce", None, None, None),  # Horovod's own default (or HOROVOD_CYCLE_TIME), for every method
        ("local_sgd", None, None, None),
        ("post_local_sgd", None, None, None),
        ("local_sgd", None, "3", None),  # the user's HOROVOD_CYCLE_TIME, read by Horovod itself
        ("allreduce", 2.5, "3", 2.5),  # and the config wins over both
        ("local_sgd", 10.0, None, 10.0),
    ],
)
def test_horovod_cycle_time_is_chosen_by_method(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    configured: float | None,
    environment: str | None,
    expected: float | None,
) -> None:
    from hpc_localsgd.config import load_config
    from hpc_localsgd.train.loop import horovod_cycle_time_ms

    if environment is None:
        monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    else:
        monkeypatch.setenv("HOROVOD_CYCLE_TIME", environment)
    overrides = [f"algorithm.method={method}"] + (["algorithm.switch_epoch=1"] if method == "post_local_sgd" else [])
    if configured is not None:
        overrides.append(f"comm.horovod_cycle_time_ms={configured}")
    assert horovod_cycle_time_ms(load_config(None, overrides)) == expected


def test_horovod_cycle_time_must_be_positive() -> None:
    from hpc_localsgd.config import load_config

    with pytest.raises(ConfigError, match="comm.horovod_cycle_time_ms: must be > 0"):
        load_config(None, ["comm.horovod_cycle_time_ms=0"])


@pytest.mark.parametrize(
    "cores,affinity,local_size,threads,expected",
    [
        (2, 2, 2, 1, True),  # this machine under mpirun -np 2: every core runs a rank
        (64, 64, 8, 4, False),  # 32 of 64 cores busy: MPI's polling has cores of its own
        (64, 64, 16, 4, True),
        (64, 4, 16, 4, True),  # bound by the launcher to 4 cores, 4 threads
        (64, 8, 16, 4, False),
    ],
)
def test_fully_subscribed_nodes_let_mpi_yield(
    monkeypatch: pytest.MonkeyPatch, cores: int, affinity: int, local_size: int, threads: int, expected: bool
) -> None:
    monkeypatch.setattr(comm_package.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(comm_package.os, "sched_getaffinity", lambda _pid: set(range(affinity)))
    launch = LaunchEnvironment("openmpi", WorldLayout(0, local_size, 0, local_size, 0, 1))
    assert comm_package.node_is_fully_subscribed(launch, threads) is expected
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    monkeypatch.setattr(comm_package.torch, "get_num_threads", lambda: threads)
    comm_package._let_mpi_yield_when_idle(launch)
    assert comm_package.os.environ.get("OMPI_MCA_mpi_yield_when_idle") == ("1" if expected else None)
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")  # the user's choice is kept
    comm_package._let_mpi_yield_when_idle(launch)
    assert comm_package.os.environ["OMPI_MCA_mpi_yield_when_idle"] == "0"


@pytest.mark.parametrize(
    ("setting", "yields"), [(None, False), ("1", True), ("true", True), (" yes", True), ("0", False), ("no", False)]
)
def test_the_mpi_backend_polls_byte_exchanges_where_open_mpi_yields(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, yields: bool
) -> None:
    # The communication thread tests non-blocking allgathers and all-to-alls between sleeps exactly where
    # Open MPI is told to yield while idle (Open MPI reads a boolean parameter's 1/true/yes alike).
    from hpc_localsgd.comm.mpi import mpi_yields_when_idle

    if setting is None:
        monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    else:
        monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", setting)
    assert mpi_yields_when_idle() is yields

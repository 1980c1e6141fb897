"""``detect_launch`` and ``threads_for_rank`` on fake environments, as each launcher sets them.

Expected layouts are worked out by hand from each launcher's documented variables.
"""

from __future__ import annotations

import os

import pytest

from hpc_localsgd.errors import LauncherMismatch
from hpc_localsgd.launcher.env import WorldLayout, detect_launch, spare_cores, threads_for_rank

ONE_PROCESS = WorldLayout(rank=0, size=1, local_rank=0, local_size=1, node_rank=0, num_nodes=1)


def test_no_launcher_is_one_process() -> None:
    launch = detect_launch({"PATH": "/usr/bin", "HOME": "/root"})
    assert launch.launcher == "none"
    assert launch.layout == ONE_PROCESS


def test_open_mpi_on_two_nodes_of_two() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        # The rank among the node's processes (of every job there), not the node's number: ignored.
        "OMPI_COMM_WORLD_NODE_RANK": "1",
    }
    launch = detect_launch(env)
    assert launch.launcher == "openmpi"
    assert launch.layout == WorldLayout(rank=3, size=4, local_rank=1, local_size=2, node_rank=0, num_nodes=2)


def test_slurm_task_counts_with_repeats() -> None:
    # '2(x3),1': nodes 0..2 run two tasks each, node 3 runs one; tasks 0..6, block distribution.
    base = {"SLURM_NTASKS": "7", "SLURM_NNODES": "4", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    last = detect_launch({**base, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"})
    assert last.launcher == "slurm"
    assert last.layout == WorldLayout(rank=6, size=7, local_rank=0, local_size=1, node_rank=3, num_nodes=4)
    middle = detect_launch({**base, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert middle.layout == WorldLayout(rank=3, size=7, local_rank=1, local_size=2, node_rank=1, num_nodes=4)


def test_slurm_step_variables_win_over_the_allocation() -> None:
    # An srun step may use part of the allocation: SLURM_STEP_* describe the step itself.
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "4",
        "SLURM_TASKS_PER_NODE": "4(x4)",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_NUM_NODES": "1",
    }
    assert detect_launch(env).layout == WorldLayout(
        rank=1, size=2, local_rank=1, local_size=2, node_rank=0, num_nodes=1
    )


def test_srun_of_an_mpi_program_reads_the_mpi_variables() -> None:
    # srun --mpi=pmi2 sets PMI_* and Slurm's variables; both describe the same world.
    env = {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "SLURM_STEP_NUM_NODES": "2",
    }
    launch = detect_launch(env)
    assert launch.launcher == "mpich"
    assert (
        launch.layout.rank,
        launch.layout.size,
        launch.layout.local_rank,
        launch.layout.local_size,
        launch.layout.num_nodes,
    ) == (2, 4, 0, 2, 2)


def test_horovodrun_wins_over_the_mpirun_it_uses() -> None:
    env = {
        "HOROVOD_RANK": "5",
        "HOROVOD_SIZE": "8",
        "HOROVOD_LOCAL_RANK": "1",
        "HOROVOD_LOCAL_SIZE": "4",
        "HOROVOD_CROSS_RANK": "1",
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
    }
    launch = detect_launch(env)
    assert launch.launcher == "horovodrun"
    assert launch.layout == WorldLayout(rank=5, size=8, local_rank=1, local_size=4, node_rank=1, num_nodes=2)


def test_torchrun() -> None:
    env = {
        "RANK": "4",
        "WORLD_SIZE": "6",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29500",
    }
    launch = detect_launch(env)
    assert launch.launcher == "torchrun"
    assert launch.layout == WorldLayout(rank=4, size=6, local_rank=1, local_size=3, node_rank=1, num_nodes=2)


@pytest.mark.parametrize(
    "env",
    [
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"},  # rank outside the world
        {
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },  # local rank outside the node
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"},  # more on a node than in all
        {"SLURM_PROCID": "zero", "SLURM_NTASKS": "2"},  # not a number
    ],
    ids=["rank", "local-rank", "local-size", "not-an-integer"],
)
def test_an_inconsistent_environment_is_a_one_line_launcher_mismatch(env: dict[str, str]) -> None:
    with pytest.raises(LauncherMismatch) as raised:
        detect_launch(env)
    assert "\n" not in str(raised.value) and str(raised.value)


LAYOUT_4_PER_NODE = WorldLayout(rank=1, size=8, local_rank=1, local_size=4, node_rank=0, num_nodes=2)


def test_threads_as_requested_win_over_everything() -> None:
    assert threads_for_rank(3, LAYOUT_4_PER_NODE, {"OMP_NUM_THREADS": "7", "SLURM_CPUS_PER_TASK": "5"}) == 3


def test_threads_from_omp_num_threads_then_slurm() -> None:
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {"OMP_NUM_THREADS": "7", "SLURM_CPUS_PER_TASK": "5"}) == 7
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {"SLURM_CPUS_PER_TASK": "5"}) == 5
    # Unusable values are skipped, not trusted.
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {"OMP_NUM_THREADS": "0", "SLURM_CPUS_PER_TASK": "5"}) == 5
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {"OMP_NUM_THREADS": "four", "SLURM_CPUS_PER_TASK": "2"}) == 2


def test_threads_share_the_node_unless_already_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {}) == 16 // 4
    crowded = WorldLayout(rank=0, size=32, local_rank=0, local_size=32, node_rank=0, num_nodes=1)
    assert threads_for_rank(0, crowded, {}) == 1  # never zero threads
    # A launcher that bound this rank to 3 cores already gave it its share.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert threads_for_rank(0, LAYOUT_4_PER_NODE, {}) == 3


def test_spare_cores_are_the_rank_share_its_threads_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    """comm.sync_thread auto: an unbound rank's share is an equal part of the node, not every core it may use."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert spare_cores(4, LAYOUT_4_PER_NODE) == 0
    assert spare_cores(1, LAYOUT_4_PER_NODE) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert spare_cores(1, LAYOUT_4_PER_NODE) == 2
    assert spare_cores(8, LAYOUT_4_PER_NODE) == 0

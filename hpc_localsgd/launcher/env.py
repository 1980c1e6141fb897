"""Who am I? Rank, local rank, world size and node, read from the launcher's environment.

Read from environment variables only (no MPI call), so that the layout is known before a
backend is chosen and so that a communicator can be checked against it: a rank that
believes it is alone while the launcher started several is the classic sign of mpi4py or
Horovod built against another MPI than the ``mpirun`` that launched it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import LauncherMismatch, RankLocalError

# Set by launcher/slownet.py for every rank it starts on an emulated slow network: the link's rate in
# tc's notation ("10mbit"). The benchmark projects that link beside its measurement; a training run
# records it in metrics.h5, where the report finds the runs whose time is a measurement on it.
EMULATED_LINK_VARIABLE = "HPC_LOCALSGD_EMULATED_LINK"

# Open MPI's MCA parameter: yield the core while waiting in MPI instead of polling (read at MPI_Init).
OPEN_MPI_YIELD_WHEN_IDLE = "OMPI_MCA_mpi_yield_when_idle"


def emulated_link_rate(env: Mapping[str, str] | None = None) -> str | None:
    """The rate of the emulated link this rank runs on (``launcher/slownet.py``), or None."""
    return (os.environ if env is None else env).get(EMULATED_LINK_VARIABLE) or None


# (launcher, rank, size, local rank, local size, node index) variable names, most specific first.
# Open MPI has no node index: its OMPI_COMM_WORLD_NODE_RANK is a rank among the processes of the
# node (of every job there), not the node's number; node_rank stays 0 there.
_LAUNCHERS: tuple[tuple[str, str, str, str, str | None, str | None], ...] = (
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "HOROVOD_CROSS_RANK"),
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        None,
    ),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None, "SLURM_NODEID"),
)


@dataclass(frozen=True)
class WorldLayout:
    """Where this rank sits: global rank and size, rank and size on its node, node index (0 where the
    launcher does not say: Open MPI, MPICH)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    node_rank: int
    num_nodes: int


@dataclass(frozen=True)
class LaunchEnvironment:
    launcher: str  # "openmpi", "slurm", "horovodrun", "mpich", "torchrun" or "none"
    layout: WorldLayout


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LauncherMismatch(f"launcher variable {name}={value!r} is not an integer") from None


def _slurm_local_size(env: Mapping[str, str], node_rank: int) -> int:
    """Tasks on this node from SLURM_TASKS_PER_NODE, e.g. '2(x3),1' → [2, 2, 2, 1]."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node_rank] if node_rank < len(counts) else 1


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """The layout given by the first launcher whose variables are set; one process otherwise.

    ``srun`` of an MPI program sets both Slurm's and PMI's variables; the MPI ones come first
    because they describe the same world.
    """
    env = os.environ if env is None else env
    for launcher, rank_var, size_var, local_rank_var, local_size_var, node_var in _LAUNCHERS:
        if rank_var not in env or size_var not in env:
            continue
        rank, size = _int(env, rank_var), _int(env, size_var)
        node_rank = _int(env, node_var) if node_var and node_var in env else 0
        local_rank = _int(env, local_rank_var) if local_rank_var in env else 0
        if local_size_var and local_size_var in env:
            local_size = _int(env, local_size_var)
        elif launcher == "slurm":
            local_size = _slurm_local_size(env, node_rank)
        else:
            local_size = size
        if "SLURM_STEP_NUM_NODES" in env:
            num_nodes = _int(env, "SLURM_STEP_NUM_NODES")
        elif launcher == "slurm" and "SLURM_NNODES" in env:
            num_nodes = _int(env, "SLURM_NNODES")
        else:
            num_nodes = max(1, -(-size // local_size))
        if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
            raise LauncherMismatch(
                f"{launcher} reports rank {rank} of {size}, local rank {local_rank} of {local_size}: inconsistent"
            )
        return LaunchEnvironment(launcher, WorldLayout(rank, size, local_rank, local_size, node_rank, num_nodes))
    return LaunchEnvironment("none", WorldLayout(0, 1, 0, 1, 0, 1))


def host_id() -> int:
    """This machine as a number below 2**62 (a hash of its host name), for ranks to compare nodes."""
    digest = hashlib.blake2b(platform.node().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def ranks_per_node(host_ids: Sequence[int]) -> int:
    """How many ranks each node holds, given every rank's :func:`host_id` in rank order, when every
    node holds as many ranks in one block of consecutive ranks (what ``ranks_per_worker: node``
    needs); else ``LauncherMismatch`` saying how the ranks are placed."""
    blocks: list[tuple[int, int]] = []  # (host, ranks) in rank order
    for host in host_ids:
        if blocks and blocks[-1][0] == host:
            blocks[-1] = (host, blocks[-1][1] + 1)
        else:
            blocks.append((host, 1))
    if len({host for host, _ in blocks}) != len(blocks):
        raise LauncherMismatch(
            f"the ranks of a node are not consecutive ({len(host_ids)} ranks on {len(set(host_ids))} nodes); "
            "place ranks by node (mpirun --map-by slot, srun --distribution=block)"
        )
    sizes = sorted({count for _, count in blocks})
    if len(sizes) > 1:
        raise LauncherMismatch(
            f"nodes hold different numbers of ranks ({', '.join(map(str, sizes))}); 'node' groups need as many "
            "ranks on every node"
        )
    return sizes[0]


def software_versions() -> dict[str, str]:
    """Versions that decide whether numbers reproduce, from package metadata (nothing is imported)."""
    from .. import __version__

    found = {"hpc_localsgd": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "numpy", "h5py", "mpi4py", "horovod"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def select_device(requested: str, layout: WorldLayout) -> torch.device:
    """``cuda:<local rank>`` when GPUs exist (or as asked), else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if requested.startswith("cuda") and not has_cuda:
        raise RankLocalError(f"train.device is {requested!r} but no CUDA device is visible to this rank")
    if not has_cuda:
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    count = torch.cuda.device_count()
    # With one GPU visible per rank (Slurm's --gpus-per-task), every rank uses its cuda:0.
    return torch.device("cuda", layout.local_rank % count)


def threads_for_rank(requested: int, layout: WorldLayout, env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads: as asked, else OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, or this rank's share of the node."""
    env = os.environ if env is None else env
    if requested > 0:
        return requested
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    return cores_for_rank(layout)


def cores_for_rank(layout: WorldLayout) -> int:
    """This rank's share of the node's cores: the cores a launcher bound it to, else an equal share."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = os.cpu_count() or allowed
    # A launcher that bound this rank to a subset of cores already gave it its share.
    share = allowed if allowed < total else total // max(1, layout.local_size)
    return max(1, share)


def spare_cores(threads: int, layout: WorldLayout) -> int:
    """The cores of this rank's share that its ``threads`` torch threads leave free (none below 0)."""
    return max(0, cores_for_rank(layout) - threads)

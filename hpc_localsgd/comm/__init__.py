"""Communicators: one interface (``base.Communicator``), one file per backend.

Backends that need horovod, mpi4py or torch.distributed are imported only when chosen, so
importing this package works (and stays fast) on a machine that has none of them.
``agree`` holds the collectives by which ranks agree on an outcome (rank 0's decision, the first
failure, a text), written once on top of the interface.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable, ConfigError, LauncherMismatch, one_line
from ..launcher.env import OPEN_MPI_YIELD_WHEN_IDLE, LaunchEnvironment, WorldLayout
from .base import Communicator, DoneHandle, Handle, check_group_size
from .single import SingleCommunicator
from .threads import ThreadCommunicator, ThreadGroup

__all__ = [
    "BACKENDS",
    "Communicator",
    "ElasticSettings",
    "DoneHandle",
    "Handle",
    "SingleCommunicator",
    "ThreadCommunicator",
    "ThreadGroup",
    "WorldLayout",
    "check_world",
    "make_communicator",
    "resolve_backend",
]

BACKENDS = ("auto", "horovod", "mpi", "torch", "single")

# The library whose MPI must agree with the launcher, per backend.
_MPI_USERS = {"mpi": "mpi4py", "horovod": "Horovod"}


def _mismatch_hint(backend: str, launcher: str) -> str:
    """The usual reason a backend sees another world than the launcher started."""
    library = _MPI_USERS.get(backend)
    if library is None:
        return "the rendezvous joined another world than the launcher's"
    if launcher == "slurm":
        return f"{library}'s MPI does not see Slurm's tasks: try srun --mpi=pmix (or pmi2), or mpirun"
    started_by = "this mpirun" if launcher in ("openmpi", "mpich") else "the launcher's"
    return f"{library} is probably built against another MPI than {started_by}"


def _horovod_import_error() -> str | None:
    """Why ``horovod.torch`` cannot be imported, or None when it can."""
    try:
        import horovod.torch  # noqa: F401
    except Exception as error:  # ImportError, or OSError/RuntimeError from a library built for another torch
        return one_line(error)
    return None


def resolve_backend(backend: str, launch: LaunchEnvironment) -> str:
    """The backend ``auto`` stands for here; any other name is returned unchanged.

    One process outside any launcher needs no communication library; torchrun sets up
    torch.distributed's rendezvous; otherwise Horovod when it is built, else plain MPI.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"comm.backend is {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if launch.launcher == "none" and launch.layout.size == 1:
        return "single"
    if launch.launcher == "torchrun":
        return "torch"
    return "horovod" if _horovod_import_error() is None else "mpi"


def node_is_fully_subscribed(launch: LaunchEnvironment, threads_per_rank: int) -> bool:
    """Whether this node's ranks run compute threads on every core it has (or the launcher bound
    this rank to no more cores than it has threads)."""
    total = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if allowed < total:  # bound by the launcher: this rank's own cores
        return threads_per_rank >= allowed
    return launch.layout.local_size * threads_per_rank >= total


def _let_mpi_yield_when_idle(launch: LaunchEnvironment) -> None:
    """Open MPI polls while it waits in a collective. The mpi backend's communication thread and
    Horovod's background thread do that waiting beside the compute threads; when those use every
    core, polling takes compute time (0.88x DDP's throughput instead of 1.01x on a fully subscribed
    node, docs/BENCHMARKS.md). Yielding while idle is what Open MPI does by itself when it sees an
    oversubscribed node; a user's own setting wins. Must happen before MPI is initialised."""
    if node_is_fully_subscribed(launch, torch.get_num_threads()):
        os.environ.setdefault(OPEN_MPI_YIELD_WHEN_IDLE, "1")


# torch.distributed's collectives end a rank that waits longer than the process group's timeout, with a
# traceback. The stall watchdog (watchdog.py) must speak first: its timeout plus this margin, and a week
# where comm.stall_timeout_seconds is off (the ranks then only warn, and wait, as they do on mpi and horovod).
_TORCH_TIMEOUT_MARGIN = datetime.timedelta(minutes=2)
_TORCH_TIMEOUT_WHEN_OFF = datetime.timedelta(days=7)


def torch_collective_timeout(stall_timeout_seconds: float | None, device: torch.device) -> datetime.timedelta | None:
    """The torch backend's collective timeout for ``comm.stall_timeout_seconds`` (None: the backend's rendezvous
    timeout). On CUDA tensors NCCL queues the collective and the host blocks later, outside the watchdog's view:
    with the watchdog's timeout off, torch's own stays what it was, so a stalled GPU job still ends."""
    if stall_timeout_seconds is not None:
        return datetime.timedelta(seconds=stall_timeout_seconds) + _TORCH_TIMEOUT_MARGIN
    return None if device.type == "cuda" else _TORCH_TIMEOUT_WHEN_OFF


def _construct(
    backend: str,
    launch: LaunchEnvironment,
    device: torch.device,
    horovod_cycle_time_ms: float | None,
    group_sizes: Sequence[int],
    across_sizes: Sequence[int],
    mpi_polling: bool | None,
    stall_warn_seconds: float | None,
    stall_timeout_seconds: float | None,
) -> Communicator:
    if backend == "single":
        if launch.layout.size != 1:
            raise LauncherMismatch(
                f"the launcher ({launch.launcher}) started {launch.layout.size} ranks but "
                "comm.backend is 'single'; use comm.backend=auto, horovod, mpi or torch"
            )
        return SingleCommunicator()
    if backend in ("horovod", "mpi"):
        _let_mpi_yield_when_idle(launch)
    if backend == "horovod":
        reason = _horovod_import_error()
        if reason is not None:
            raise BackendUnavailable(
                f"comm.backend is 'horovod' but horovod.torch cannot be imported: {reason}; "
                "build it with scripts/install.sh or use comm.backend=mpi"
            )
        from .horovod import HorovodCommunicator

        return HorovodCommunicator(
            launch.layout, horovod_cycle_time_ms, group_sizes, across_sizes, stall_check_seconds=stall_warn_seconds
        )
    if backend == "mpi":
        try:
            import mpi4py.MPI  # noqa: F401  # initialises MPI; failures here are the user's to fix
        except Exception as error:
            raise BackendUnavailable(
                f"comm.backend is 'mpi' but mpi4py cannot be imported: {one_line(error)}; "
                "install mpi4py against this MPI (scripts/install.sh)"
            ) from None
        from .mpi import MPICommunicator

        return MPICommunicator(launch.layout, polling=mpi_polling)
    from .torch_dist import TorchDistributedCommunicator

    timeout = torch_collective_timeout(stall_timeout_seconds, device)
    return TorchDistributedCommunicator(launch.layout, launch.launcher, device, collective_timeout=timeout)


@dataclass(frozen=True)
class ElasticSettings:
    """``comm.on_worker_loss: continue``: how long a silent worker may go unheard, how many ranks a worker has."""

    worker_timeout: float
    ranks_per_worker: int
    rejoin: bool = False  # replace a lost worker of a running job (train --rejoin)


def _construct_elastic(
    backend: str, launch: LaunchEnvironment, device: torch.device, settings: ElasticSettings
) -> Communicator:
    if backend != "torch":
        raise ConfigError(
            f"comm.on_worker_loss: continue needs the torch backend, and this launcher ({launch.launcher}) gets "
            f"{backend}: set comm.backend=torch (with MASTER_ADDR and MASTER_PORT, or under torchrun), or use stop"
        )
    if device.type != "cpu":
        raise ConfigError(f"comm.on_worker_loss: continue runs on the CPU (Gloo), not yet on {device}; use stop")
    from .elastic import ElasticCommunicator

    if settings.rejoin:
        if settings.ranks_per_worker != 1:
            raise ConfigError("--rejoin replaces a worker of one rank; not yet a worker of several (ranks_per_worker)")
        return ElasticCommunicator(launch.layout, launch.launcher, settings.worker_timeout, 1, rejoin=True)
    workers = launch.layout.size // settings.ranks_per_worker
    if workers < 2:
        raise ConfigError(
            f"comm.on_worker_loss: continue needs at least 2 workers to go on without one; this run has {workers}"
        )
    return ElasticCommunicator(launch.layout, launch.launcher, settings.worker_timeout, settings.ranks_per_worker)


def check_world(communicator: Communicator, launch: LaunchEnvironment) -> None:
    """Raise ``LauncherMismatch`` when the backend's rank or size differs from the launcher's."""
    expected = launch.layout
    if communicator.size != expected.size:
        raise LauncherMismatch(
            f"the launcher ({launch.launcher}) started {expected.size} ranks but the "
            f"{communicator.name} backend sees {communicator.size}: "
            f"{_mismatch_hint(communicator.name, launch.launcher)}"
        )
    if communicator.rank != expected.rank:
        raise LauncherMismatch(
            f"the launcher ({launch.launcher}) says this is rank {expected.rank} but the "
            f"{communicator.name} backend says {communicator.rank}: "
            f"{_mismatch_hint(communicator.name, launch.launcher)}"
        )


def make_communicator(
    backend: str,
    launch: LaunchEnvironment,
    device: torch.device,
    horovod_cycle_time_ms: float | None = None,
    group_sizes: Sequence[int] = (),
    across_sizes: Sequence[int] = (),
    mpi_polling: bool | None = None,
    elastic: ElasticSettings | None = None,
    stall_warn_seconds: float | None = None,
    stall_timeout_seconds: float | None = None,
) -> Communicator:
    """The communicator for ``backend`` (one of ``BACKENDS``), checked against the launcher's world.

    Raises ``ConfigError`` for an unknown name, ``BackendUnavailable`` when the backend's
    library is missing, and ``LauncherMismatch`` when the backend sees another world than
    the launcher started (each a one-line ``UserError``). ``horovod_cycle_time_ms`` sets Horovod's
    cycle time when Horovod is the backend (None: Horovod's own setting).

    ``group_sizes`` are the group sizes the caller will ``split`` this communicator into (every
    level of a hierarchy). Only Horovod needs them in advance: its groups are process sets
    registered at ``hvd.init``, and its ``split`` refuses other sizes (1 and the world size need no
    registration). ``across_sizes`` are, in the same way, the sizes the caller will ``split_across``
    (the world communicator only, on Horovod). The other backends split into any size, but the sizes are
    checked for every backend alike: ValueError unless each divides the launcher's world size.
    ``mpi_polling``: ``comm.mpi_polling`` for the mpi backend (None: auto, decided per communicator).
    ``elastic``: members may leave (``comm.on_worker_loss: continue``): the torch backend on the CPU only,
    built by comm/elastic.py; ``ConfigError`` where the backend or device is another.
    ``stall_warn_seconds`` sets Horovod's own stall check to the watchdog's warning time (None: Horovod's
    setting); ``stall_timeout_seconds`` puts the torch backend's collective timeout past the watchdog's.
    """
    for ranks in group_sizes:
        check_group_size(ranks, launch.layout.size)
    for ranks in across_sizes:
        check_group_size(ranks, launch.layout.size, across=True)
    chosen = resolve_backend(backend, launch)
    if elastic is not None:
        communicator = _construct_elastic(chosen, launch, device, elastic)
    else:
        communicator = _construct(
            chosen,
            launch,
            device,
            horovod_cycle_time_ms,
            group_sizes,
            across_sizes,
            mpi_polling,
            stall_warn_seconds,
            stall_timeout_seconds,
        )
    if elastic is not None and elastic.rejoin:
        return communicator  # its world is the running job's, not its launcher's
    try:
        check_world(communicator, launch)
    except LauncherMismatch:
        communicator.close()
        raise
    return communicator

"""torch.distributed backend: NCCL for CUDA tensors, Gloo on the CPU.

Gloo has no average reduction, so every reduction is a sum followed by a division by the
world size, the same rule as the other backends.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import BackendUnavailable, LauncherMismatch, one_line
from ..launcher.env import WorldLayout
from ._buffers import check_buffer, divide_by_size_
from .base import Communicator, Handle

# Long enough for a slow node to reach the first collective; short enough that a rank that
# died before the rendezvous ends the job instead of hanging it for the default 30 minutes.
_RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)


def _free_tcp_port() -> int:
    """A port the OS considers free now; the store binds it moments later (a small, accepted race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def rendezvous_address(layout: WorldLayout, launcher: str, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Where rank 0's TCP store listens: MASTER_ADDR/MASTER_PORT, else agreed over MPI, else an error.

    Under ``mpirun`` or ``srun`` nobody sets MASTER_ADDR, but MPI already connects the ranks:
    rank 0 picks its host name and a free port and broadcasts them over ``COMM_WORLD``.
    """
    env = os.environ if env is None else env
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if address and port:
        if not port.isdigit():
            raise BackendUnavailable(f"MASTER_PORT={port!r} is not a port number")
        return address, int(port)
    if address or port:
        missing = "MASTER_PORT" if address else "MASTER_ADDR"
        raise BackendUnavailable(
            f"comm.backend is 'torch' and {missing} is not set while its partner is; "
            "set both MASTER_ADDR and MASTER_PORT"
        )
    try:
        from mpi4py import MPI
    except Exception as error:  # ImportError, or an OSError from a broken libmpi
        raise BackendUnavailable(
            "comm.backend is 'torch' but MASTER_ADDR/MASTER_PORT are not set and mpi4py "
            f"cannot be imported to agree on them ({one_line(error)}); set MASTER_ADDR and "
            "MASTER_PORT"
        ) from None
    world = MPI.COMM_WORLD
    if (world.Get_size(), world.Get_rank()) != (layout.size, layout.rank):
        cause = (
            "try srun --mpi=pmix (or pmi2)"
            if launcher == "slurm"
            else "mpi4py is probably built against another MPI than this launcher's"
        )
        raise LauncherMismatch(
            f"the launcher ({launcher}) says rank {layout.rank} of {layout.size} but MPI says "
            f"rank {world.Get_rank()} of {world.Get_size()}: {cause}, or set MASTER_ADDR and "
            "MASTER_PORT to agree without MPI"
        )
    chosen = (socket.gethostname(), _free_tcp_port()) if world.Get_rank() == 0 else None
    root_host, port = world.bcast(chosen, root=0)
    # Ranks on rank 0's node connect over loopback, which needs no name resolution (often missing in containers).
    return ("127.0.0.1" if root_host == socket.gethostname() else root_host), port


class _WorkHandle(Handle):
    """A torch.distributed ``Work``; the sum becomes an average after it completes."""

    def __init__(self, work: Any, buffer: torch.Tensor, divisor: int) -> None:
        self._work: Any | None = work
        self._buffer = buffer
        self._divisor = divisor

    def wait(self) -> None:
        if self._work is None:
            return
        # For NCCL this orders the current CUDA stream after the reduction, so the division below follows it.
        self._work.wait()
        self._work = None
        divide_by_size_(self._buffer, self._divisor)


class TorchDistributedCommunicator(Communicator):
    """A default process group built from the launcher's layout; destroyed by ``close``."""

    name = "torch"

    def __init__(self, launcher_layout: WorldLayout, launcher: str, device: torch.device) -> None:
        if not dist.is_available():
            raise BackendUnavailable("comm.backend is 'torch' but this torch is built without torch.distributed")
        self._device = device
        self._process_backend = "nccl" if device.type == "cuda" else "gloo"
        if self._process_backend == "nccl" and not dist.is_nccl_available():
            raise BackendUnavailable("comm.backend is 'torch' on a CUDA device but this torch has no NCCL")
        if self._process_backend == "gloo" and not dist.is_gloo_available():
            raise BackendUnavailable("comm.backend is 'torch' on the CPU but this torch has no Gloo")
        address, port = rendezvous_address(launcher_layout, launcher)
        host = f"[{address}]" if ":" in address else address  # IPv6 literals need brackets in a URL
        dist.init_process_group(
            self._process_backend,
            init_method=f"tcp://{host}:{port}",
            rank=launcher_layout.rank,
            world_size=launcher_layout.size,
            timeout=_RENDEZVOUS_TIMEOUT,
        )
        super().__init__(dataclasses.replace(launcher_layout, rank=dist.get_rank(), size=dist.get_world_size()))

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
        return _WorkHandle(work, buffer, self.size if average else 1)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        dist.broadcast(buffer, src=root)

    def barrier(self) -> None:
        if self._process_backend == "nccl":
            # Without device_ids NCCL guesses the device from the rank and may pick the wrong one.
            dist.barrier(device_ids=[self._device.index or 0])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            # Gloo's worker threads release the tensors of finished collectives; one that does so
            # while the interpreter shuts down aborts the process. A barrier issued after every
            # other collective lets them finish that work before the group goes away.
            self.barrier()
            dist.destroy_process_group()

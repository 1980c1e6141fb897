"""torch.distributed backend: NCCL for CUDA tensors, Gloo on the CPU.

NCCL refuses two ranks on one GPU; when more ranks run on a node than it has GPUs and the launcher
bound no GPU to each rank, CUDA tensors go over Gloo instead (``process_group_backend``), which
stages them through host memory.

Gloo has no average reduction, so every reduction is a sum followed by a division by the
world size (a group's size, for a group), the same rule as the other backends.
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
from ._buffers import check_alltoall, check_buffer, check_gather, divide_by_size_
from .base import Communicator, Handle, Partition, across_layout, group_layout, partition_across, partition_into
from .single import SingleCommunicator

# Long enough for a slow node to reach the first collective; short enough that a rank that
# died before the rendezvous ends the job instead of hanging it for the default 30 minutes.
_RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)


def process_group_backend(
    device: torch.device, ranks_on_node: int, visible_gpus: int, env: Mapping[str, str] | None = None
) -> str:
    """The torch.distributed backend for tensors on ``device``: Gloo on the CPU; on CUDA, NCCL unless
    ranks must share a GPU (more ranks on the node than GPUs visible, and no CUDA_VISIBLE_DEVICES set
    per rank by the launcher, as Slurm's --gpus-per-task does), where NCCL refuses to start."""
    env = os.environ if env is None else env
    if device.type != "cuda":
        return "gloo"
    sharing = ranks_on_node > visible_gpus and not env.get("CUDA_VISIBLE_DEVICES")
    return "gloo" if sharing else "nccl"


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
    chosen = (socket.gethostname(), _network_namespace(), _free_tcp_port()) if world.Get_rank() == 0 else None
    root_host, root_namespace, port = world.bcast(chosen, root=0)
    # Ranks on rank 0's node connect over loopback, which needs no name resolution (often missing in
    # containers); but a rank in another network namespace of that host cannot reach rank 0's loopback,
    # and its host name does not say where rank 0 is. Every rank stops then, not only that one.
    local = root_host == socket.gethostname()
    if any(world.allgather(local and root_namespace != _network_namespace())):
        raise BackendUnavailable(
            "comm.backend is 'torch' and some rank runs on rank 0's host but in another network namespace, "
            "where rank 0's address cannot be told from its host name; set MASTER_ADDR (an address of rank 0 "
            "that every rank reaches) and MASTER_PORT"
        )
    return ("127.0.0.1" if local else root_host), port


def _network_namespace() -> str:
    """This process's network namespace (``/proc/self/ns/net``'s target), or '' where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


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
    """A default process group built from the launcher's layout; destroyed by ``close``.

    Groups (``split``, ``split_across``) are ``dist.new_group`` process groups on the same backend (Gloo or
    NCCL). torch.distributed wants every rank of the world to create every group, members or not, in the
    same order. Each communicator therefore knows the partition of the world it belongs to (its own world
    ranks and those of its siblings, the same on every rank): a split creates the groups of every part's
    split, in order, keeps this rank's, and keeps the lot for a later split into the same partition. A
    group's split is therefore collective over the world, not only over the group: every rank of the world
    must call it (through its own group) in the same order.
    """

    name = "torch"

    def __init__(
        self,
        launcher_layout: WorldLayout,
        launcher: str,
        device: torch.device,
        collective_timeout: datetime.timedelta | None = None,
    ) -> None:
        """``collective_timeout``: how long a collective may wait before torch ends the rank (None: the
        rendezvous timeout); the rendezvous keeps its own, short one, so that a rank that never arrives
        ends the job soon."""
        if not dist.is_available():
            raise BackendUnavailable("comm.backend is 'torch' but this torch is built without torch.distributed")
        self._device = device
        visible_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        self._process_backend = process_group_backend(device, launcher_layout.local_size, visible_gpus)
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
        if collective_timeout is not None:
            # Not through init_process_group, whose timeout also bounds the wait for every rank to arrive.
            set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
            set_timeout(collective_timeout)
        self._collective_timeout = collective_timeout
        self._process_group: Any = None  # None: the default (world) group
        world_ranks = tuple(range(dist.get_world_size()))
        self._members = world_ranks  # the world ranks of this communicator's ranks 0, 1, ...
        self._partition: Partition = (world_ranks,)  # this communicator's members and its siblings'
        self._world: TorchDistributedCommunicator = self
        self._groups: dict[Partition, TorchDistributedCommunicator] = {}  # this rank's group of each partition
        super().__init__(dataclasses.replace(launcher_layout, rank=dist.get_rank(), size=dist.get_world_size()))

    @property
    def waits_beside(self) -> bool:
        # Work.wait gives up the Python lock, and Gloo queues work from any thread. NCCL's wait orders the
        # waiting thread's CUDA stream, so only host collectives are waited for beside the step.
        return self._process_backend == "gloo"

    def _group(self, partition: Partition, layout: WorldLayout) -> TorchDistributedCommunicator:
        """This rank's part of ``partition`` (of the world), creating the groups of every part first
        (collective over the world) unless an earlier split made them."""
        world = self._world
        if partition in world._groups:
            return world._groups[partition]
        world_rank = self._members[self.rank]
        mine: Any = None
        members: tuple[int, ...] = ()
        for part in partition:
            process_group = dist.new_group(ranks=list(part), timeout=world._collective_timeout)
            if world_rank in part:
                mine, members = process_group, part
        group = TorchDistributedCommunicator.__new__(TorchDistributedCommunicator)
        group._device = self._device
        group._process_backend = self._process_backend
        group._process_group = mine
        group._members = members
        group._partition = partition
        group._world = world
        group._groups = {}
        Communicator.__init__(group, layout)
        world._groups[partition] = group
        return group

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self._process_group, async_op=True)
        return _WorkHandle(work, buffer, self.size if average else 1)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, self.size)
        # Raw bytes, so that any dtype travels on Gloo and NCCL alike (no arithmetic happens).
        # torch 2.14 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(
            output.view(torch.uint8).reshape(-1),
            buffer.reshape(-1).view(torch.uint8),
            group=self._process_group,
            async_op=True,
        )
        return _WorkHandle(work, output, 1)

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_alltoall(buffer, output, self.size)
        # Raw bytes: all_to_all_single splits the first dimension evenly, one row per rank.
        work = dist.all_to_all_single(
            output.view(torch.uint8).reshape(self.size, -1),
            buffer.view(torch.uint8).reshape(self.size, -1),
            group=self._process_group,
            async_op=True,
        )
        return _WorkHandle(work, output, 1)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this group of {self.size}")
        # ``src`` is a rank of the world, also for a group.
        dist.broadcast(buffer, src=self._members[root], group=self._process_group)

    def barrier(self) -> None:
        if self._process_backend == "nccl":
            # Without device_ids NCCL guesses the device from the rank and may pick the wrong one.
            dist.barrier(group=self._process_group, device_ids=[self._device.index or 0])
        else:
            dist.barrier(group=self._process_group)

    def collective_path(self, device: torch.device) -> str:
        if self._process_backend == "nccl":
            return "torch.distributed NCCL on device memory"
        if device.type == "cuda":
            return "torch.distributed Gloo on CUDA tensors via host memory (ranks share a GPU: NCCL refuses)"
        return "torch.distributed Gloo on host memory"

    def _split(self, ranks: int) -> Communicator:
        if ranks == 1:
            return SingleCommunicator(name=self.name)
        return self._group(partition_into(self._partition, ranks), group_layout(self.rank, ranks))

    def _split_across(self, ranks: int) -> Communicator:
        if ranks == self.size:
            return SingleCommunicator(name=self.name)
        return self._group(partition_across(self._partition, ranks), across_layout(self.rank, ranks, self.size))

    def close(self) -> None:
        """The world's close destroys every process group, its groups' too; a group's does nothing."""
        if self._world is not self:
            return
        if dist.is_initialized():
            # Gloo's worker threads release the tensors of finished collectives; one that does so
            # while the interpreter shuts down aborts the process. A barrier issued after every
            # other collective lets them finish that work before the group goes away (each group
            # has threads of its own, hence a barrier in each of this rank's groups first).
            for group in self._groups.values():
                group.barrier()
            self.barrier()
            dist.destroy_process_group()

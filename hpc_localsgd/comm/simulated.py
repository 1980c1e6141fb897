"""W workers simulated in one process: the tensors are stacked over the workers, and a collective
is an operation along that leading dimension.

This is what lets one workstation run the study's 16 or 64 workers: the model's forward and
backward for all workers are one batched computation (see ``train/replicas.py``), while the
averaging engine, its schedule, outer optimizers and gradient buckets are the very objects that
run under MPI; only this communicator differs.

Sums run in worker order 0..W−1, as the ``threads`` backend sums in rank order, so a simulation
agrees bit for bit with W threads and, for W = 2, with any MPI's a + b.

``split(n)`` gives the communicator of the simulated groups of n consecutive workers: its buffers are
still stacked over all W workers, and each collective acts within every block of n rows at once.
``split_across(n)`` gives the communicator of the stride classes: rows j, j + n, j + 2n, ... for each j.
Both are views of the rows as [outer, size, inner]: a communicator's members are the ``size`` rows
o·size·inner + m·inner + i (m = 0..size−1) for each (o, i), so every split of every such communicator
is one too (see ``_split`` and ``_split_across``).
"""

from __future__ import annotations

import torch

from ..launcher.env import WorldLayout
from ._buffers import divide_by_size_
from .base import Communicator, DoneHandle, Handle, check_group_size

# 16-bit floats are summed in float32 and rounded once at the end, as the other backends do.
_ACCUMULATION_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class SimulatedCommunicator(Communicator):
    """``workers`` workers in this process; every buffer has shape ``[workers, ...]``.

    With ``group_size`` n (a divisor of ``workers``), the communicator of every group of n consecutive
    workers at once: rows g·n .. g·n + n − 1 are reduced among themselves, and ``size`` is n (the size
    of each group, as ``size`` is the size of its group for one MPI rank). ``rank`` is 0 either way:
    one process stands for all of them. ``split_across`` gives communicators whose members are spread
    over the rows (``stride``: the distance between a class's consecutive rows).
    """

    name = "simulated"

    def __init__(self, workers: int, group_size: int | None = None, stride: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"a simulation needs at least one worker, got {workers}")
        size = workers if group_size is None else group_size
        check_group_size(size, workers)
        check_group_size(size * stride, workers)
        super().__init__(WorldLayout(rank=0, size=size, local_rank=0, local_size=size, node_rank=0, num_nodes=1))
        self.replicas = workers
        self._stride = stride  # ``inner`` of the [outer, size, inner] view of the rows

    def collective_path(self, device: torch.device) -> str:
        return f"in-process averages over stacked replicas on {device.type}"

    def _check(self, buffer: torch.Tensor) -> None:
        if buffer.dim() == 0 or buffer.shape[0] != self.replicas:
            raise ValueError(
                f"the simulated backend's buffers are stacked over its {self.replicas} workers; "
                f"got shape {tuple(buffer.shape)}"
            )

    def _blocks(self, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer`` viewed as [outer, size, inner, ...], members along dimension 1; ``view`` (never a copy,
        splitting one dimension always has strides) so writes land in it."""
        outer = self.replicas // (self.size * self._stride)
        return buffer.view(outer, self.size, self._stride, *buffer.shape[1:])

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        self._check(buffer)
        if self.size == 1:
            return DoneHandle()
        blocks = self._blocks(buffer)
        total = blocks[:, 0].to(dtype=_ACCUMULATION_DTYPES.get(buffer.dtype, buffer.dtype), copy=True)
        for member in range(1, self.size):  # in row order, as the threads backend sums in rank order
            total += blocks[:, member]
        if average:
            divide_by_size_(total, self.size)
        blocks.copy_(total.to(buffer.dtype).unsqueeze(1).expand_as(blocks))
        return DoneHandle()

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        """The identity on the stacked rows: every worker's buffer is already in this process, and each
        group's members are where ``iallreduce_`` finds them (``output`` has the buffer's shape)."""
        self._check(buffer)
        if output.shape != buffer.shape or output.dtype != buffer.dtype or output.device != buffer.device:
            raise ValueError(
                f"the simulated backend gathers into an output shaped like its stacked buffer "
                f"({tuple(buffer.shape)} {buffer.dtype}); got {tuple(output.shape)} {output.dtype}"
            )
        output.copy_(buffer)
        return DoneHandle()

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        self._check(buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} does not exist among {self.size} workers")
        blocks = self._blocks(buffer)
        blocks.copy_(blocks[:, root : root + 1].expand_as(blocks).clone())

    def barrier(self) -> None:
        return None

    def _split(self, ranks: int) -> Communicator:
        # Members m = b·ranks + m' of [outer, size, inner]: [outer·size/ranks, ranks, inner], same stride.
        return SimulatedCommunicator(self.replicas, group_size=ranks, stride=self._stride)

    def _split_across(self, ranks: int) -> Communicator:
        # Members m = k·ranks + j of [outer, size, inner]: [outer, size/ranks, ranks·inner].
        return SimulatedCommunicator(self.replicas, group_size=self.size // ranks, stride=self._stride * ranks)

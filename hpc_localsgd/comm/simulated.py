"""W workers simulated in one process: the tensors are stacked over the workers, and a collective
is an operation along that leading dimension.

This is what lets one workstation run the study's 16 or 64 workers: the model's forward and
backward for all workers are one batched computation (see ``train/replicas.py``), while the
averaging engine, its schedule, outer optimizers and gradient buckets are the very objects that
run under MPI; only this communicator differs.

Sums run in worker order 0..W−1, as the ``threads`` backend sums in rank order, so a simulation
agrees bit for bit with W threads and, for W = 2, with any MPI's a + b.
"""

from __future__ import annotations

import torch

from ..launcher.env import WorldLayout
from ._buffers import divide_by_size_
from .base import Communicator, DoneHandle, Handle

# 16-bit floats are summed in float32 and rounded once at the end, as the other backends do.
_ACCUMULATION_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class SimulatedCommunicator(Communicator):
    """``workers`` workers in this process; every buffer has shape ``[workers, ...]``."""

    name = "simulated"

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a simulation needs at least one worker, got {workers}")
        super().__init__(WorldLayout(rank=0, size=workers, local_rank=0, local_size=workers, node_rank=0, num_nodes=1))
        self.replicas = workers

    def _check(self, buffer: torch.Tensor) -> None:
        if buffer.dim() == 0 or buffer.shape[0] != self.replicas:
            raise ValueError(
                f"the simulated backend's buffers are stacked over its {self.replicas} workers; "
                f"got shape {tuple(buffer.shape)}"
            )

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        self._check(buffer)
        if self.replicas == 1:
            return DoneHandle()
        total = buffer[0].to(dtype=_ACCUMULATION_DTYPES.get(buffer.dtype, buffer.dtype), copy=True)
        for worker in range(1, self.replicas):
            total += buffer[worker]
        if average:
            divide_by_size_(total, self.replicas)
        buffer.copy_(total.to(buffer.dtype).unsqueeze(0).expand_as(buffer))
        return DoneHandle()

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        self._check(buffer)
        if not 0 <= root < self.replicas:
            raise ValueError(f"broadcast root {root} does not exist among {self.replicas} workers")
        buffer.copy_(buffer[root : root + 1].expand_as(buffer).clone())

    def barrier(self) -> None:
        return None

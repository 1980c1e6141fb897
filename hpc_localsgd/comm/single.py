"""One process, no launcher: every collective is the identity (the average of one value is itself)."""

from __future__ import annotations

import torch

from ..launcher.env import WorldLayout
from ._buffers import check_alltoall, check_buffer, check_gather
from .base import Communicator, DoneHandle, Handle

SINGLE_PROCESS_LAYOUT = WorldLayout(rank=0, size=1, local_rank=0, local_size=1, node_rank=0, num_nodes=1)


class SingleCommunicator(Communicator):
    """The world of one rank; lets the whole stack run without MPI (laptops, unit tests).

    Also every backend's group of one rank (``split(1)``), then carrying that backend's ``name``.
    """

    name = "single"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(SINGLE_PROCESS_LAYOUT)
        if name is not None:
            self.name = name

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        return DoneHandle()

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, 1)
        output[0].copy_(buffer)
        return DoneHandle()

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_alltoall(buffer, output, 1)
        output.copy_(buffer)
        return DoneHandle()

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a world of one rank")

    def barrier(self) -> None:
        return None

    def collective_path(self, device: torch.device) -> str:
        return "no communication: one rank"

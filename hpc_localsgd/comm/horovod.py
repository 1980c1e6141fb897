"""Horovod backend (``horovod.torch``): Horovod's background thread runs the collectives.

Horovod matches operations across ranks by name, and a name may not be reused while an
operation with it is in flight. Each operation is named from a per-communicator counter;
since every rank starts collectives in the same order, the n-th operation carries the same
name everywhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any

import torch

from ..errors import BackendUnavailable, one_line
from ..launcher.env import WorldLayout
from ._buffers import check_buffer, divide_by_size_
from .base import Communicator, Handle

# The dtypes horovod.torch 0.28 accepts (horovod/torch/adapter_v2.cc); bfloat16 is not one of them.
_HOROVOD_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64}
)
# Broadcast moves bits without arithmetic: other dtypes travel as integers of the same width.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _HorovodHandle(Handle):
    """A Horovod allreduce in flight; integer averaging and bfloat16 copy-back happen in ``wait``."""

    def __init__(self, hvd: Any, hvd_handle: int, buffer: torch.Tensor, reduced: torch.Tensor, divisor: int) -> None:
        self._hvd = hvd
        self._hvd_handle: int | None = hvd_handle
        self._buffer = buffer
        self._reduced = reduced  # ``buffer`` itself, or its float32 copy for bfloat16
        self._divisor = divisor

    def wait(self) -> None:
        if self._hvd_handle is None:
            return
        self._hvd.synchronize(self._hvd_handle)
        self._hvd_handle = None
        divide_by_size_(self._reduced, self._divisor)
        if self._reduced is not self._buffer:
            self._buffer.copy_(self._reduced)


class HorovodCommunicator(Communicator):
    """Collectives through ``horovod.torch``; Horovod's own rank and size, node fields from the launcher."""

    name = "horovod"

    def __init__(self, launcher_layout: WorldLayout, cycle_time_ms: float | None = None) -> None:
        import horovod.torch as hvd  # imported here: horovod is optional and initialises MPI

        if cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"  # read once, by hvd.init()

        try:
            hvd.init()
        except Exception as error:  # e.g. a Gloo-only build started by mpirun instead of horovodrun
            raise BackendUnavailable(
                f"comm.backend is 'horovod' but Horovod failed to start: {one_line(error)}"
            ) from None
        self._hvd = hvd
        self._operation_numbers = itertools.count()
        super().__init__(dataclasses.replace(launcher_layout, rank=hvd.rank(), size=hvd.size()))

    def _next_name(self, kind: str) -> str:
        return f"hpc_localsgd.{kind}.{next(self._operation_numbers)}"

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        if buffer.dtype == torch.bfloat16:
            reduced = buffer.float()
        elif buffer.dtype in _HOROVOD_DTYPES:
            reduced = buffer
        else:
            raise TypeError(f"the horovod backend cannot all-reduce {buffer.dtype} buffers")
        # Horovod's Average scales by 1/size, which would truncate integers toward zero;
        # integers are summed and then floor-divided like on every other backend.
        native_average = average and reduced.is_floating_point()
        op = self._hvd.Average if native_average else self._hvd.Sum
        hvd_handle = self._hvd.allreduce_async_(reduced, op=op, name=self._next_name("allreduce"))
        divisor = self.size if average and not native_average else 1
        return _HorovodHandle(self._hvd, hvd_handle, buffer, reduced, divisor)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        # A same-width integer view shares the buffer's memory, so the broadcast still lands in place.
        travelling = buffer if buffer.dtype in _HOROVOD_DTYPES else buffer.view(_SAME_WIDTH_INT[buffer.element_size()])
        self._hvd.broadcast_(travelling, root_rank=root, name=self._next_name("broadcast"))

    def barrier(self) -> None:
        if hasattr(self._hvd, "barrier"):
            self._hvd.barrier()
        else:  # Horovod < 0.23: a one-element allreduce cannot finish before every rank joins it
            self._hvd.allreduce_(torch.zeros(1), op=self._hvd.Sum, name=self._next_name("barrier"))

    def close(self) -> None:
        self._hvd.shutdown()

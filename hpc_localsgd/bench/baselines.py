"""The reference loops the package is compared with, written the way their documentation teaches.

This is the one place outside ``hpc_localsgd/comm/`` that imports horovod and
torch.distributed directly: a baseline that went through the package's communicator would
measure the package against itself. Their loss is the plain loops' (classifiers and language models
alike), and they clip the averaged gradient where the package's step does (optim.clip_grad_norm).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from ..comm.base import Communicator
from ..errors import one_line
from ..launcher.env import LaunchEnvironment
from .workload import Workload, plain_loss, synchronize_device


def horovod_unavailable() -> str | None:
    """Why ``horovod.torch`` cannot be used here, or None."""
    try:
        import horovod.torch  # noqa: F401
    except Exception as error:  # ImportError, or an OSError from a build for another torch
        return one_line(error)
    return None


class HorovodSession:
    """Horovod, initialised for the baseline unless the package's horovod backend already did it."""

    def __init__(self, comm: Communicator) -> None:
        import horovod.torch as hvd

        self.hvd = hvd
        self.owned = comm.name != "horovod"
        if self.owned:
            hvd.init()
        if (hvd.rank(), hvd.size()) != (comm.rank, comm.size):
            raise RuntimeError(
                f"Horovod sees rank {hvd.rank()} of {hvd.size()}, the communicator rank {comm.rank} of {comm.size}"
            )

    def close(self) -> None:
        if self.owned:
            self.hvd.shutdown()


class HorovodLoop:
    """``hvd.DistributedOptimizer``: per-tensor allreduces started from gradient hooks, fused by
    Horovod's background thread, awaited in ``optimizer.step()``."""

    name = "horovod"

    def __init__(self, workload: Workload, session: HorovodSession) -> None:
        hvd = session.hvd
        self.workload = workload
        self.model = workload.new_model()
        optimizer = workload.new_optimizer(self.model)
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=self.model.named_parameters())
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)

    def run(self, steps: int) -> None:
        clip = self.workload.cfg.optim.clip_grad_norm
        for step in range(steps):
            x, y = self.workload.batch(step)
            self.optimizer.zero_grad()  # Horovod's wrapper takes no set_to_none; torch's default (True) applies
            loss = plain_loss(self.model(x), y)
            loss.backward()
            if clip is None:
                self.optimizer.step()
                continue
            # Horovod's recipe for clipping: wait for the averaged gradients, clip, step without waiting again.
            self.optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        synchronize_device(self.workload.device)

    def comm_seconds(self) -> float:
        return 0.0  # hidden inside optimizer.step(); not separated for the baselines

    def bytes_sent(self) -> int:
        return 0


class DDPSession:
    """A torch.distributed process group for DistributedDataParallel.

    When the package's torch backend already owns the default group, DDP uses that group;
    otherwise one is created here (Gloo on the CPU, NCCL on GPUs) at an address agreed over
    MPI, exactly as the torch backend does, and destroyed by ``close``.
    """

    def __init__(self, comm: Communicator, launch: LaunchEnvironment, device: torch.device) -> None:
        import torch.distributed as dist

        from ..comm.torch_dist import rendezvous_address

        self.dist = dist
        self.device = device
        self.owned = not dist.is_initialized()
        if self.owned:
            address, port = rendezvous_address(launch.layout, launch.launcher)
            host = f"[{address}]" if ":" in address else address
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                init_method=f"tcp://{host}:{port}",
                rank=comm.rank,
                world_size=comm.size,
                timeout=datetime.timedelta(minutes=5),
            )

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            # Lets Gloo's worker threads finish with the last collectives' tensors before the group goes.
            if self.device.type == "cuda":
                self.dist.barrier(device_ids=[self.device.index or 0])
            else:
                self.dist.barrier()
            self.dist.destroy_process_group()


class DDPLoop:
    """``torch.nn.parallel.DistributedDataParallel`` with its default gradient bucketing."""

    name = "ddp"

    def __init__(self, workload: Workload, session: DDPSession, bucket_mb: float) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.workload = workload
        model = workload.new_model()
        device_ids: Any = [workload.device.index or 0] if workload.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_mb)
        self.optimizer = workload.new_optimizer(self.model)

    def run(self, steps: int) -> None:
        clip = self.workload.cfg.optim.clip_grad_norm
        for step in range(steps):
            x, y = self.workload.batch(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss = plain_loss(self.model(x), y)
            loss.backward()  # DDP's reducer has averaged the gradients when it returns
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        synchronize_device(self.workload.device)

    def comm_seconds(self) -> float:
        return 0.0  # overlapped inside backward by DDP's reducer; not separated for the baselines

    def bytes_sent(self) -> int:
        return 0

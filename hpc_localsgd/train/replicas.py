"""W workers' models and batches stacked into one, for the ``simulated`` backend.

``ReplicatedModel`` holds every parameter and buffer of the model once per worker, stacked
along a new leading dimension, and computes all workers' forward passes as one batched call
(``torch.func.vmap`` over ``functional_call``). Autograd then yields each worker's gradient in
its row; an SGD step on the stacked tensors is each worker's SGD step, because SGD with
momentum and weight decay is elementwise. BatchNorm updates each worker's running statistics
in its own row.

``ReplicatedBatches`` gives worker w exactly the batches rank w of an MPI run gets.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, vmap

from .data import Batch, Datasets, ShardedBatches

# vmap loops over the workers in CPU attention (GPT's) and warns at every call: expected, the simulated backend checks.
_CPU_ATTENTION_FALLBACK = re.escape(
    "There is a performance drop because we have not yet implemented the batching rule for "
    "aten::_scaled_dot_product_flash_attention_for_cpu"
)


def _key(name: str) -> str:
    return name.replace(".", "__")  # module attribute names cannot contain dots


class ReplicatedModel(nn.Module):
    """``workers`` copies of ``base``: inputs ``[workers, batch, ...]``, outputs ``[workers, batch, classes]``."""

    def __init__(self, base: nn.Module, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self._base = [base]  # in a list: its own parameters must not count as this module's
        self.stacked = nn.Module()
        self._parameter_names = [name for name, _ in base.named_parameters()]
        self._buffer_names = [name for name, _ in base.named_buffers()]
        # A parameter two modules share (GPT's head is its token embedding) is stacked once, under its
        # first name; a state_dict also lists it under the others.
        first_name = {id(p): name for name, p in base.named_parameters()}
        self._tied_names = {
            name: first_name[id(p)]
            for name, p in base.named_parameters(remove_duplicate=False)
            if first_name[id(p)] != name
        }
        for name, p in base.named_parameters():
            copies = p.detach().unsqueeze(0).repeat(workers, *([1] * p.dim()))
            self.stacked.register_parameter(_key(name), nn.Parameter(copies, requires_grad=p.requires_grad))
        for name, b in base.named_buffers():
            self.stacked.register_buffer(_key(name), b.detach().unsqueeze(0).repeat(workers, *([1] * b.dim())))

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def stacked_parameter(self, name: str) -> nn.Parameter:
        """The base model's parameter ``name``, stacked over the workers."""
        return self.stacked._parameters[_key(name)]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> ReplicatedModel:
        super().train(mode)
        self.base.train(mode)
        return self

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Looked up at every call: the averaging engine re-points parameters and buffers into its flat storage.
        params = {name: self.stacked._parameters[_key(name)] for name in self._parameter_names}
        buffers = {name: self.stacked._buffers[_key(name)] for name in self._buffer_names}
        return params, buffers  # type: ignore[return-value]

    def _one_worker(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = self._state()
        # vmap's BatchNorm rule loses its in-place running-statistics update when the stacked buffer
        # is not contiguous (as the engine's views into its [workers, n] storage are): hand it
        # contiguous copies and write them back.
        staged = {name: b.contiguous() for name, b in buffers.items() if not b.is_contiguous()}
        # "different": each worker draws its own dropout masks, as separate ranks would.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CPU_ATTENTION_FALLBACK, category=UserWarning)
            out = vmap(self._one_worker, randomness="different")(params, {**buffers, **staged}, x)
        for name, copy in staged.items():
            buffers[name].copy_(copy)
        return out

    def worker_forward(self, worker: int, x: torch.Tensor) -> torch.Tensor:
        """One worker's model on an ordinary batch (evaluation of the averaged model)."""
        params, buffers = self._state()
        return self._one_worker(
            {n: p[worker] for n, p in params.items()}, {n: b[worker] for n, b in buffers.items()}, x
        )

    def worker_state(self, worker: int) -> dict[str, torch.Tensor]:
        """Worker ``worker``'s parameters and buffers under the base model's names (a state_dict)."""
        params, buffers = self._state()
        state = {name: t[worker].detach() for name, t in {**params, **buffers}.items()}
        return state | {name: state[first] for name, first in self._tied_names.items()}


class ReplicatedBatches:
    """Every worker's batch of a step, stacked: ``x`` is ``[workers, batch, ...]``, ``y`` ``[workers, batch]``."""

    def __init__(self, datasets: Datasets, batch_size: int, workers: int, seed: int, augment: bool) -> None:
        self.shards = [
            ShardedBatches(datasets.train, batch_size, worker, workers, seed, augment=augment)
            for worker in range(workers)
        ]

    @property
    def steps_per_epoch(self) -> int:
        return self.shards[0].steps_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        for batches in zip(*(shard.epoch(epoch, start_batch) for shard in self.shards), strict=True):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])

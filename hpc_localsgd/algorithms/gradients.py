"""Synchronous SGD: gradients averaged every step, communication overlapped with backward.

Parameters are grouped into buckets (reverse registration order, which is roughly the order
backward produces gradients, as in DDP). A post-accumulate-grad hook copies each gradient
into its bucket's flat buffer; a full bucket starts a non-blocking allreduce while backward
goes on. Buckets start strictly in index order so that every rank issues its collectives
in the same order (MPI requires it). ``finish`` waits and copies the averages back.
Each step says over which communicator its gradients are averaged: all ranks in the
synchronous phase, the ranks of one worker in the local phase when workers are groups of
ranks (algorithms/hierarchy.py), or none.
With a simulated backend (``comm.replicas`` workers in one process) every gradient is stacked
over the workers, and so is each bucket: ``[workers, elements]``.

Compressed gradients (``comm.gradient_compression``, as Horovod's ``Compression.fp16``): a float32
bucket averaged over all ranks travels as bf16 or fp16, through the compressed exchange of
algorithms/compression.py without error feedback, so that it is decoded and summed in fp32 in rank
order on every rank rather than summed in half precision on the wire. Buckets averaged inside a
worker stay fp32: that traffic stays on the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..comm.base import Communicator, Handle
from ..config.schema import GradientCompression
from .accounting import GLOBAL, CommStats
from .compression import CompressedAverager
from .flat import column_view


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    flat: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0
    handle: Handle | None = None
    filled: set[int] = field(default_factory=set)
    compressed: CompressedAverager | None = None  # how it travels between all ranks; None: fp32


class GradientAllreduce:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        comm: Communicator,
        bucket_bytes: int,
        stats: CommStats,
        compression: GradientCompression = "none",
    ) -> None:
        """``compression``: the codec of float32 buckets averaged over all ranks (``GLOBAL``)."""
        self.stats = stats
        self.compression = compression
        self.replicas = comm.replicas
        self.enabled = False
        self._step_comm: Communicator = comm  # this step's group
        self._level = GLOBAL
        self.buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) → (bucket, position)
        trainable = [p for p in params if p.requires_grad]
        current: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for p in reversed(trainable):
            key = (p.dtype, p.device)
            current.setdefault(key, []).append(p)
            sizes[key] = sizes.get(key, 0) + p.numel() // self.replicas * p.element_size()
            if sizes[key] >= bucket_bytes:
                self._add_bucket(current.pop(key))
                sizes[key] = 0
        for members in current.values():
            self._add_bucket(members)
        # Per worker, per step: over all ranks (encoded where compressed), and inside a worker (fp32).
        self.bytes_per_step = sum(
            b.flat.shape[-1] * b.flat.element_size() if b.compressed is None else b.compressed.bytes_per_sync
            for b in self.buckets
        )
        self.fp32_bytes_per_step = sum(b.flat.shape[-1] * b.flat.element_size() for b in self.buckets)
        self._next_to_start = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in trainable]

    def _add_bucket(self, members: list[torch.nn.Parameter]) -> None:
        total = sum(p.numel() // self.replicas for p in members)
        shape = (total,) if self.replicas == 1 else (self.replicas, total)
        flat = torch.zeros(shape, dtype=members[0].dtype, device=members[0].device)
        views, offset = [], 0
        for position, p in enumerate(members):
            width = p.numel() // self.replicas
            views.append(column_view(flat, offset, offset + width, p.shape))
            offset += width
            self._where[id(p)] = (len(self.buckets), position)
        compressed = None
        if self.compression != "none" and flat.dtype == torch.float32:
            compressed = CompressedAverager(self.compression, tuple(flat.shape), False, flat.device)
        self.buckets.append(_Bucket(members, flat, views, compressed=compressed))

    def start_step(self, comm: Communicator | None, level: str = GLOBAL) -> None:
        """Average this step's gradients over ``comm`` (counted as ``level``); None: not at all."""
        self.enabled = comm is not None
        if comm is not None:
            self._step_comm, self._level = comm, level
        self._next_to_start = 0
        for bucket in self.buckets:
            bucket.filled.clear()
            bucket.handle = None

    @property
    def averaged_over_all(self) -> bool:
        """Whether this step's gradients are averaged over every rank (the synchronous phase)."""
        return self.enabled and self._level == GLOBAL

    def restart(self) -> None:
        """Average this step's gradients again, over the same communicator (whose members changed), from the
        gradients in ``.grad``: ``finish`` then fills every bucket from them."""
        self.start_step(self._step_comm, self._level)

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        index, position = self._where[id(param)]
        bucket = self.buckets[index]
        if position in bucket.filled:
            return  # a parameter used twice in the graph; its final grad is copied at finish()
        assert param.grad is not None  # a post-accumulate-grad hook runs once the grad is set
        bucket.views[position].copy_(param.grad)
        bucket.filled.add(position)
        self._start_ready_buckets()
        # Buckets in flight advance while backward goes on (needed by MPI without a communication thread).
        for started in self.buckets[: self._next_to_start]:
            assert started.handle is not None
            started.handle.progress()

    def _start_ready_buckets(self) -> None:
        while self._next_to_start < len(self.buckets):
            bucket = self.buckets[self._next_to_start]
            if len(bucket.filled) < len(bucket.params):
                return
            with self.stats.timed():
                if bucket.compressed is not None and self._level == GLOBAL:
                    bucket.handle = bucket.compressed.iaverage_(self._step_comm, bucket.flat)
                else:
                    bucket.handle = self._step_comm.iallreduce_(bucket.flat, average=True)
            self._next_to_start += 1

    def finish(self) -> None:
        """Wait for every bucket and write the averaged gradients into ``param.grad``."""
        if not self.enabled:
            return
        with self.stats.timed():
            for bucket in self.buckets:
                if bucket.handle is None:
                    # Parameters without a gradient this step contribute zeros on this rank.
                    for position, p in enumerate(bucket.params):
                        if position not in bucket.filled:
                            if p.grad is None:
                                bucket.views[position].zero_()
                            else:
                                bucket.views[position].copy_(p.grad)
                            bucket.filled.add(position)
                    self._start_ready_buckets()
            for bucket in self.buckets:
                assert bucket.handle is not None
                bucket.handle.wait()
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views, strict=True):
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
        self.stats.count(self._level, self.bytes_per_step if self._level == GLOBAL else self.fp32_bytes_per_step)
        self.enabled = False

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

"""The problem every measurement shares: one model definition, one optimizer recipe, fixed batches.

Every configuration gets its own copy of the model, built from the same seed, so that all of
them start from identical weights and see identical batches; only what happens between
``backward`` and the next step differs. Batches are made once and kept in memory (different
on every rank, as data-parallel shards are): data loading is not what is measured here. A classifier
learns random images and labels; a language model (``gpt``) random token ids, inputs and targets alike
int64 ``[batch, seq_len]``, its loss over every position.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.engine import AveragingEngine
from ..algorithms.hierarchy import Hierarchy
from ..algorithms.optimizer_state import make_inner_optimizer
from ..algorithms.schedule import SyncSchedule
from ..comm.base import Communicator
from ..config.schema import (
    AlgorithmConfig,
    GradientCompression,
    Method,
    OuterMethod,
    Precision,
    RunConfig,
    SyncCompression,
)
from ..launcher.env import spare_cores
from ..train.data import derive_seed
from ..train.device import compiled_forward
from ..train.models import build_model
from ..train.run import cross_entropy, hidden_matrices

# Distinct in-memory batches each rank cycles through.
BATCHES_PER_RANK = 4
# A small constant LR: the benchmark trains on random labels for a few hundred steps, and the
# time of a step must not depend on where the weights wander.
LEARNING_RATE = 1e-3
# The sync period of a loop that never averages: more steps than any benchmark runs.
NEVER = sys.maxsize


def synchronize_device(device: torch.device) -> None:
    """Wait for queued device work, so that a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Workload:
    cfg: RunConfig
    device: torch.device
    rank: int
    input_shape: tuple[int, ...]  # one sample's: (3, side, side) images, or (seq_len,) token ids
    num_classes: int  # a language model's are its token ids (model.gpt.vocab)
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def create(cls, cfg: RunConfig, device: torch.device, rank: int, num_classes: int) -> Workload:
        """``num_classes``: a classifier's; a language model (model.name gpt) has model.gpt.vocab instead."""
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "bench-data", rank))
        batch = cfg.data.batch_size
        batches = []
        if cfg.model.name == "gpt":
            shape: tuple[int, ...] = (cfg.model.gpt.seq_len,)
            num_classes = cfg.model.gpt.vocab
            for _ in range(BATCHES_PER_RANK):
                x = torch.randint(0, num_classes, (batch, *shape), generator=generator)
                y = torch.randint(0, num_classes, (batch, *shape), generator=generator)
                batches.append((x.to(device), y.to(device)))
        else:
            shape = (3, cfg.data.image_size, cfg.data.image_size)
            for _ in range(BATCHES_PER_RANK):
                x = torch.randn(batch, *shape, generator=generator)
                y = torch.randint(0, num_classes, (batch,), generator=generator)
                batches.append((x.to(device), y.to(device)))
        return cls(cfg, device, rank, shape, num_classes, batches)

    @property
    def tokens_per_sample(self) -> int | None:
        """A language model's window (its rates in tokens/s are samples/s times it); None for a classifier."""
        return self.input_shape[0] if self.cfg.model.name == "gpt" else None

    def new_model(self) -> nn.Module:
        """The same initial weights on every call and every rank."""
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.model, self.num_classes, self.input_shape).to(self.device)
        model.train()
        return model

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_inner_optimizer(model.parameters(), self.cfg.optim, LEARNING_RATE, hidden_matrices(model))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[step % len(self.batches)]

    def batches_in(self, channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches, their images in channels-last memory format when asked (token ids stay as they are)."""
        if not channels_last:
            return self.batches
        return [(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y) for x, y in self.batches]


def _schedule(algorithm: AlgorithmConfig, sync_period: int | None) -> SyncSchedule:
    """Local SGD from step 0 (every H, or never), or synchronous throughout; no LR decay, as post-local
    SGD is not measured."""
    if sync_period is None:
        # Local from step 0, so that the engine installs no gradient hooks, with a period no window reaches.
        return SyncSchedule(NEVER, 0)
    return SyncSchedule.from_config(algorithm, steps_per_epoch=1)


def _logits_and_loss(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's loss, as training computes it: cross-entropy along the last dimension."""
    out = model(x)
    return out, cross_entropy(out, y)


def plain_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain loops' loss, as nanoGPT writes it: every position's logits against its target. A classifier's
    [batch, classes] against [batch] goes through the views unchanged (``F.cross_entropy(out, y)``)."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


class TrainingLoop(Protocol):
    """A configuration that trains ``steps`` steps; ``comm_seconds``/``bytes_sent`` count its traffic."""

    name: str

    def run(self, steps: int) -> None: ...

    def comm_seconds(self) -> float: ...

    def bytes_sent(self) -> int: ...


class EngineLoop:
    """The package's training step (``AveragingEngine.train_step``, the one training calls), under one
    sync schedule fixed at construction.

    Each schedule a phase compares (every H, the no-communication limit) is a loop of its own: the
    engine fixes what depends on the schedule when it is built (gradient hooks for a synchronous
    phase, the anchors and buffers of a delayed sync), so a schedule is never swapped into a running
    engine. Nor is a model flattened a second time for a new engine: ``flatten_training_state``
    creates the momentum buffers anew (zeros), and an engine with worker groups splits the
    communicator when it is built (groups that live as long as the communicator). Every loop's
    model comes from the same seed and every rank starts from rank 0's, so the loops compared start
    from the same values and cycle through the same batches.
    """

    def __init__(
        self,
        name: str,
        workload: Workload,
        comm: Communicator,
        algorithm: Method,
        sync_period: int | None = 1,
        outer: OuterMethod = "none",
        hierarchy: Hierarchy | None = None,
        precision: Precision = "fp32",
        channels_last: bool = False,
        sync_delay: int = 0,
        fragments: int = 1,
        compression: SyncCompression = "none",
        compiled: bool = False,
        gradient_compression: GradientCompression = "none",
        sync_thread: bool | None = None,
    ) -> None:
        """``sync_period`` None: local SGD that never averages, each rank alone (the no-communication
        limit). ``hierarchy``: worker groups (None: every rank is a worker). With workers of several
        ranks the engine averages gradients inside each worker every local step and the model over all
        ranks every ``sync_period`` steps. ``sync_delay``, ``fragments``, ``compression``: the streaming
        and compressed global syncs (error feedback as comm.error_feedback resolves it for the codec);
        ``gradient_compression``: the synchronous steps' gradients in half precision; ``sync_thread``:
        comm.sync_thread for this engine (None: the config's, auto by default)."""
        self.name = name
        self.workload = workload
        cfg = workload.cfg
        self.algorithm = dataclasses.replace(
            cfg.algorithm,
            method=algorithm,
            sync_period=1 if sync_period is None else sync_period,
            outer=outer,
            ranks_per_worker=1 if hierarchy is None else hierarchy.ranks_per_worker,
            sync_delay=sync_delay,
            fragments=fragments,
        )
        self.algorithm.validate()
        comm_cfg = dataclasses.replace(
            cfg.comm,
            sync_compression=compression,
            gradient_compression=gradient_compression,
            sync_thread=cfg.comm.sync_thread if sync_thread is None else sync_thread,
        )
        self.model = workload.new_model()
        self.optimizer = workload.new_optimizer(self.model)
        # ``compiled``: the forward through torch.compile, as training's train.compile does it.
        self.forward_model = compiled_forward(self.model, workload.device) if compiled else self.model
        self.engine = AveragingEngine(
            self.model,
            self.optimizer,
            comm,
            self.algorithm,
            _schedule(self.algorithm, sync_period),
            bucket_bytes=int(comm_cfg.bucket_mb * 2**20),
            hierarchy=hierarchy,
            precision=precision,
            compression=compression,
            error_feedback=comm_cfg.uses_error_feedback,
            gradient_compression=gradient_compression,
            sync_thread=comm_cfg.uses_sync_thread(spare_cores(torch.get_num_threads(), comm.layout)),
            clip_grad_norm=cfg.optim.clip_grad_norm,  # as training clips (the language model's recipe does)
        )
        self.engine.broadcast_initial_state()
        # As training feeds them (train/device.py): the weights keep the flat buffer's layout.
        self.batches = workload.batches_in(channels_last)
        # Steps done: a window goes on from the last one's step, as training does, so that an average
        # still in flight at a window's end (sync_delay = sync_period) is applied in the next one, and a
        # window of whole sync periods ends with a sync.
        self.completed = 0

    def run(self, steps: int) -> None:
        model = self.forward_model
        for step in range(self.completed, self.completed + steps):
            x, y = self.batches[step % len(self.batches)]
            self.engine.train_step(step, LEARNING_RATE, functools.partial(_logits_and_loss, model, x, y))
        self.completed += steps
        synchronize_device(self.workload.device)

    def comm_seconds(self) -> float:
        return self.engine.stats.comm_seconds

    def thread_cpu_seconds(self) -> tuple[float, float | None]:
        """CPU seconds so far of the engine's sync thread (0 without one) and of the backend's own
        communication thread (None where it has none it can measure); the second is the process's, shared
        by every loop on the communicator."""
        return self.engine.sync_thread_cpu_seconds, self.engine.comm.thread_cpu_seconds()

    def bytes_sent(self) -> int:
        return self.engine.stats.bytes_sent

    def bytes_by_level(self) -> dict[str, int]:
        """Bytes sent so far per level of the hierarchy (``worker``, ``global``)."""
        return dict(self.engine.stats.bytes_by_level)

    def close(self) -> None:
        self.engine.drain()  # every rank started what is still in flight, so every rank waits for it
        self.engine.close()


class PlainLoop:
    """Each rank alone: forward, backward, optimizer step; no engine, no communicator. With a precision
    or channels-last, written the way torchvision's reference recipe does it: the model converted with
    ``.to(memory_format=torch.channels_last)``, autocast around forward and loss, GradScaler for fp16.
    For a language model it is nanoGPT's loop: ``model(x)``, cross-entropy of the flattened logits, backward,
    ``clip_grad_norm_`` (where the package's step clips: optim.clip_grad_norm), ``step()``,
    ``zero_grad(set_to_none=True)``; the optimizer is the package's (AdamW for gpt), built the same way."""

    name = "bare"

    def __init__(
        self, workload: Workload, precision: Precision = "fp32", channels_last: bool = False, compiled: bool = False
    ) -> None:
        self.workload = workload
        self.model = workload.new_model()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model = torch.compile(self.model) if compiled else self.model  # the usual way
        self.optimizer = workload.new_optimizer(self.model)
        self.batches = workload.batches_in(channels_last)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(workload.device.type) if precision == "fp16" else None

    def run(self, steps: int) -> None:
        device_type = self.workload.device.type
        clip = self.workload.cfg.optim.clip_grad_norm
        for step in range(steps):
            x, y = self.batches[step % len(self.batches)]
            with torch.autocast(
                device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
            ):
                loss = plain_loss(self.forward_model(x), y)
            if self.scaler is None:
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                if clip is not None:
                    self.scaler.unscale_(self.optimizer)  # clip the true gradient, as torch's AMP recipe does
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize_device(self.workload.device)

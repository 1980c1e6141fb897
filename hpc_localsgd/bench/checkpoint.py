"""Checkpoint write and read (``CheckpointWriter``, ``Checkpoint.read``) against raw h5py of the same
bytes (rawio.py): what the package's metadata, checksums and agreement collectives cost."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xxhash

from ..comm.agree import broadcast_text
from ..comm.base import Communicator
from ..io.checkpoint import Checkpoint, CheckpointWriter, bytes_of, to_numpy
from ..train.checkpointer import rank_state
from .context import BenchContext
from .figures import bytes_figure
from .rawio import raw_read, raw_write
from .stats import Figure, Target, paired_ratios
from .timing import gather, slowest, split_by_repetition, timed

CHECKPOINT_TARGET = Target(">=", 0.80)
# Writes before reads (a read needs its file); package and raw alternate which goes first.
ORDERS = (("write", "write_raw", "read", "read_raw"), ("write_raw", "write", "read_raw", "read"))


def hash_all(arrays: dict[str, np.ndarray]) -> None:
    """The checkpoint's integrity digests of ``arrays`` alone (what the package adds to a raw write)."""
    for array in arrays.values():
        xxhash.xxh3_64_intdigest(bytes_of(array))


def shared_folder(comm: Communicator, parent: Path) -> Path:
    """A fresh folder made by rank 0 under ``parent``, its name broadcast to every rank."""
    made = tempfile.mkdtemp(prefix=".hpc-localsgd-bench-", dir=parent) if comm.is_root else None
    return Path(broadcast_text(comm, made, root=0))


class CheckpointActions:
    """The four timed actions on one folder: the package's write and read, and raw h5py's."""

    def __init__(self, ctx: BenchContext, folder: Path) -> None:
        self.comm, self.folder = ctx.comm, folder
        slowmo = ctx.slowmo_loop()
        slowmo.run(1)  # one local step: every rank's state differs from rank 0's, so all of it is written
        self.engine = slowmo.engine
        self.state = rank_state(self.engine)
        self.shared: dict[str, torch.Tensor] = self.engine.shared_state()
        self.raw_shared = {n: to_numpy(t) for n, t in self.shared.items()} if self.comm.is_root else {}
        self.raw_mine = {n: to_numpy(t) for n, t in self.state.tensors.items()}
        self.writer = CheckpointWriter(folder, self.comm, keep=ctx.options.repeats + ctx.options.warmup + 1)
        self.counter = iter(range(10**9))
        self.written: list[Path] = []

    def by_name(self) -> dict[str, Callable[[], None]]:
        return {"write": self.write, "write_raw": self.write_raw, "read": self.read, "read_raw": self.read_raw}

    def write(self) -> None:
        self.written.append(self.writer.write(next(self.counter), 0.0, {"method": "bench"}, self.shared, self.state))

    def write_raw(self) -> None:
        raw_write(self.comm, self.folder / f"raw-{next(self.counter)}.h5", self.raw_shared, self.raw_mine)

    def read(self) -> None:  # as a resume reads: into the engine's live state
        into = (self.engine.rank_state(), self.shared)
        Checkpoint(self.written[-1]).read(self.comm.rank, shared=self.comm.is_root, into=into)

    def read_raw(self) -> None:
        raw_read(self.comm, self.latest_raw())

    def latest_raw(self) -> Path:
        return sorted(self.folder.glob("raw-*.h5"))[-1]

    def warm_page_cache(self) -> None:
        # Both reads are timed from the page cache: freshly written pages can be reclaimed or still
        # settling after the writes, which once made whichever read came first several times slower.
        for path in (self.written[-1], self.latest_raw()):
            with open(path, "rb") as file:
                while file.read(16 << 20):
                    pass
        self.comm.barrier()

    def clean(self) -> None:
        self.comm.barrier()
        if self.comm.is_root:
            for path in self.folder.glob("*.h5"):
                path.unlink()
        self.comm.barrier()

    def payload_bytes(self) -> float:
        """Bytes of one checkpoint over all ranks."""
        mine = sum(a.nbytes for a in self.raw_mine.values()) + sum(a.nbytes for a in self.raw_shared.values())
        return float(gather(self.comm, [float(mine)]).sum())


def run(ctx: BenchContext) -> None:
    comm, options = ctx.comm, ctx.options
    folder = shared_folder(comm, options.checkpoint_folder())
    try:
        actions = CheckpointActions(ctx, folder)
        times = _measure(ctx, actions)
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(folder, ignore_errors=True)
    per_name = split_by_repetition(slowest(comm, [t for n in times for t in times[n]]), options.repeats)
    slow = dict(zip(times, per_name, strict=True))
    _add_figures(ctx, actions.payload_bytes(), slow)


def _measure(ctx: BenchContext, actions: CheckpointActions) -> dict[str, list[float]]:
    """Seconds per repetition of each action on this rank, and of the integrity hashing alone."""
    by_name = actions.by_name()
    for _ in range(ctx.options.warmup):
        for action in (*by_name.values(), actions.clean):
            action()
    times: dict[str, list[float]] = {name: [] for name in (*by_name, "hash")}
    for repetition in range(ctx.options.repeats):
        order = ORDERS[repetition % 2]
        for name in order[:2]:
            times[name].append(timed(ctx.comm, ctx.device, by_name[name]))
        actions.warm_page_cache()
        for name in order[2:]:
            times[name].append(timed(ctx.comm, ctx.device, by_name[name]))
        actions.clean()
    # Integrity hashing is what the package adds to a raw write/read: time it alone, for the explanation.
    for _ in range(ctx.options.repeats):
        times["hash"].append(timed(ctx.comm, ctx.device, functools.partial(hash_all, actions.raw_mine)))
    return times


def _add_figures(ctx: BenchContext, payload: float, slow: dict[str, list[float]]) -> None:
    def seconds(name: str, figure_id: str, description: str) -> Figure:
        return Figure(f"checkpoint.{figure_id}", "checkpoint", description, "s", slow[name])

    def over_raw(name: str) -> Figure:
        return Figure(
            f"checkpoint.{name}_over_raw",
            "checkpoint",
            f"checkpoint {name} throughput over raw h5py (paired)",
            "ratio",
            paired_ratios(slow[f"{name}_raw"], slow[name]),
            target=CHECKPOINT_TARGET,
        )

    ctx.add(
        bytes_figure(
            "checkpoint.bytes",
            "checkpoint",
            "payload of one checkpoint: every rank's parameters, BN statistics and momentum, and SlowMo's x_prev and u",
            [payload],
            "B",
        ),
        seconds("write", "write_seconds", "CheckpointWriter.write, all ranks, with fsync"),
        seconds("write_raw", "raw_write_seconds", "raw h5py write of the same bytes, same fsyncs"),
        over_raw("write"),
        seconds(
            "read",
            "read_seconds",
            "Checkpoint(path).read(rank) into the engine's live state as a resume does, the shared state on "
            "rank 0 only (page cache warm)",
        ),
        seconds("read_raw", "raw_read_seconds", "raw h5py read of the same datasets"),
        over_raw("read"),
        Figure(
            "checkpoint.write_bandwidth",
            "checkpoint",
            "payload bytes / write time",
            "GB/s",
            [payload / t / 1e9 for t in slow["write"]],
        ),
        seconds(
            "hash", "hash_seconds", "xxh3-64 of one rank's bytes, once (the integrity digest the package computes)"
        ),
    )

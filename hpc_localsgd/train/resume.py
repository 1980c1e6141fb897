"""Choosing and applying a checkpoint when a run continues (``--resume auto|PATH``)."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..algorithms.engine import AveragingEngine
from ..comm.agree import agree_on_failure, decide_on_root
from ..comm.base import Communicator
from ..config.load import config_to_dict
from ..config.schema import RunConfig
from ..io.checkpoint import Checkpoint, CheckpointError, RankState, checkpoint_name, list_checkpoints

RESHARD_MODES = ("average", "reset")


@dataclass
class ChosenCheckpoint:
    """The checkpoint a run continues from and, for an exact resume, this rank's part of it,
    already read and verified while choosing (so that every byte is read once)."""

    checkpoint: Checkpoint
    state: RankState | None = None
    shared: dict[str, torch.Tensor] | None = None


def _nth_newest_step(directory: Path, position: int) -> int:
    found = list_checkpoints(directory)
    if position >= len(found):
        return -1
    match = re.match(r"^step-(\d+)\.h5$", found[position].name)
    assert match is not None
    return int(match.group(1))


def choose_checkpoint(
    comm: Communicator,
    resume: str,
    directory: Path,
    locking: bool,
    warn: Callable[[str], None],
    cfg: RunConfig,
    reshard: str | None,
    into: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
) -> ChosenCheckpoint | None:
    """The checkpoint to continue from, checked against ``cfg`` and verified by the ranks together.

    ``auto`` tries the checkpoints of ``directory`` newest first and falls back past damaged ones
    (each reported through ``warn``), or starts fresh (None) when none is left; a path must be
    valid. For an exact resume each rank reads and verifies its own state and the shared state,
    and the ranks agree on the outcome: a damaged part stops everyone, whoever owns it, and no
    rank reads another's state. Re-sharding reads every saved rank, so rank 0 verifies the whole
    file first. ``into``: the engine's live (rank, shared) state, which an exact resume reads into
    where the saved tensors match it; a checkpoint passed over leaves them partly overwritten,
    which the chosen one's ``restore`` overwrites in full.
    """
    for position in itertools.count():
        if resume == "auto":
            step = decide_on_root(comm, functools.partial(_nth_newest_step, directory, position))
            if step < 0:
                return None
            path = directory / checkpoint_name(step)
        else:
            path = Path(resume)
        chosen: ChosenCheckpoint | None = None
        failure: str | None = None
        try:
            chosen = ChosenCheckpoint(Checkpoint(path, locking))
        except CheckpointError as exc:
            failure = str(exc)
        message = agree_on_failure(comm, failure)
        if message is None:
            assert chosen is not None
            # Another model or world is not damage: refused, never skipped.
            check_compatible(chosen.checkpoint, cfg, comm.size, reshard)
            try:
                if reshard is None:
                    chosen.state, chosen.shared = chosen.checkpoint.read(comm.rank, into=into)
                    chosen.checkpoint.verify_rng(comm.rank)
                elif comm.is_root:
                    chosen.checkpoint.verify()
            except CheckpointError as exc:
                failure = str(exc)
            message = agree_on_failure(comm, failure)
            if message is None:
                return chosen
        if resume != "auto":
            raise CheckpointError(message)
        warn(f"skipping {message}")
    raise AssertionError("unreachable")


def check_compatible(checkpoint: Checkpoint, cfg: RunConfig, world_size: int, reshard: str | None) -> None:
    """Refuse a checkpoint of another model always, and of another world size or algorithm unless re-sharding."""
    saved = yaml.safe_load(checkpoint.meta.config) or {}
    current = config_to_dict(cfg)
    where = f"checkpoint '{checkpoint.path}'"

    def differences(section: str) -> str:
        # A key the checkpoint holds by its former name (algorithm.momentum_buffers) is today's.
        renamed: dict[str, str] = getattr(type(getattr(cfg, section)), "RENAMED_KEYS", {})
        old = {renamed.get(k, k): v for k, v in (saved.get(section) or {}).items()}
        new = current[section]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{section}.{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys)

    if differences("model"):
        raise CheckpointError(f"{where} holds another model ({differences('model')}); it cannot be resumed")
    if reshard is None:
        if checkpoint.meta.world_size != world_size:
            raise CheckpointError(
                f"{where} was written by {checkpoint.meta.world_size} ranks, this run has "
                f"{world_size}; pass --reshard average (or reset) to continue with its "
                "parameters and averaged (or zeroed) per-rank optimizer state"
            )
        inner = (saved.get("optim") or {}).get("name", "sgd")  # written before optim.name existed: SGD
        if inner != cfg.optim.name:
            raise CheckpointError(
                f"{where} was written with inner optimizer {inner!r}, this run uses {cfg.optim.name!r}; pass "
                "--reshard reset to continue from its parameters with the new optimizer's state at zero"
            )
        if differences("algorithm"):
            raise CheckpointError(
                f"{where} was written with another algorithm ({differences('algorithm')}); "
                "pass --reshard average (or reset) to continue from its parameters"
            )


def restore(
    chosen: ChosenCheckpoint | Checkpoint,
    engine: AveragingEngine,
    model: torch.nn.Module,
    rank: int,
    reshard: str | None,
) -> tuple[dict[str, float], float, int]:
    """Load this rank's state into the live model and engine.

    Exact resume: rank r takes rank r's saved state and random states. Re-shard: every rank
    takes the mean over the saved ranks of parameters and BN statistics, and of the optimizer's
    state (``average``) or zeros (``reset``); error feedback starts at zero; RNG and loss
    accumulators start afresh.
    Returns (communication counters, train loss sum, train loss count) to continue from.
    """
    if isinstance(chosen, Checkpoint):
        chosen = ChosenCheckpoint(chosen)
    checkpoint = chosen.checkpoint
    step = checkpoint.meta.step
    if reshard is None:
        state = chosen.state if chosen.state is not None else checkpoint.rank_state(rank)
        tensors = state.tensors
        checkpoint.restore_rng(rank)
    else:
        state = checkpoint.rank_state(0)
        # Error-feedback residuals belong to one rank (and its shard): a re-sharded run starts them at zero.
        tensors = {name: t.double() for name, t in state.tensors.items() if not name.startswith("error")}
        for other in range(1, checkpoint.meta.world_size):  # one saved rank in memory at a time
            for name, t in checkpoint.rank_state(other).tensors.items():
                if name in tensors:
                    tensors[name] += t.double()
        tensors = {name: (t / checkpoint.meta.world_size).to(state.tensors[name].dtype) for name, t in tensors.items()}
        if reshard == "reset":
            tensors = {name: t for name, t in tensors.items() if not engine.is_optimizer_state(name)}
    engine.load_state(tensors, chosen.shared if chosen.shared is not None else checkpoint.shared(), step)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.int_buffers.items():
            buffers[name].copy_(value)
    if reshard is None:
        return state.comm_stats, state.train_loss_sum, state.train_loss_count
    return state.comm_stats, 0.0, 0

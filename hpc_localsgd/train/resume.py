"""Choosing and applying a checkpoint when a run continues (``--resume auto|PATH``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ..algorithms.engine import AveragingEngine
from ..comm.base import Communicator, decide_on_root
from ..config.load import config_to_dict
from ..config.schema import RunConfig
from ..io.checkpoint import Checkpoint, CheckpointError, checkpoint_name, latest_valid

RESHARD_MODES = ("average", "reset")


def choose_checkpoint(comm: Communicator, resume: str, directory: Path, locking: bool,
                      warn: Callable[[str], None]) -> Optional[Checkpoint]:
    """Rank 0 picks (and fully verifies) the checkpoint; every rank opens the same one.

    ``auto`` takes the newest valid checkpoint in ``directory`` and falls back past damaged
    ones, or starts fresh (None) when there is none; a path must be valid.
    """
    def pick() -> int:
        if resume == "auto":
            found = latest_valid(directory, warn, locking)
            return -1 if found is None else found.meta.step
        checkpoint = Checkpoint(Path(resume), locking)
        checkpoint.verify()
        return checkpoint.meta.step

    step = decide_on_root(comm, pick)
    if step < 0:
        return None
    return Checkpoint(directory / checkpoint_name(step) if resume == "auto" else Path(resume), locking)


def check_compatible(checkpoint: Checkpoint, cfg: RunConfig, world_size: int, reshard: Optional[str]) -> None:
    """Refuse a checkpoint of another model always, and of another world size or algorithm unless re-sharding."""
    saved = yaml.safe_load(checkpoint.meta.config) or {}
    current = config_to_dict(cfg)
    where = f"checkpoint '{checkpoint.path}'"

    def differences(section: str) -> str:
        old, new = saved.get(section, {}), current[section]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{section}.{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys)

    if differences("model"):
        raise CheckpointError(f"{where} holds another model ({differences('model')}); it cannot be resumed")
    if reshard is None:
        if checkpoint.meta.world_size != world_size:
            raise CheckpointError(f"{where} was written by {checkpoint.meta.world_size} ranks, this run has "
                                  f"{world_size}; pass --reshard average (or reset) to continue with its "
                                  "parameters and averaged (or zeroed) per-rank optimizer state")
        if differences("algorithm"):
            raise CheckpointError(f"{where} was written with another algorithm ({differences('algorithm')}); "
                                  "pass --reshard average (or reset) to continue from its parameters")


def restore(checkpoint: Checkpoint, engine: AveragingEngine, model: torch.nn.Module, rank: int,
            reshard: Optional[str]) -> tuple[dict[str, float], float, int]:
    """Load this rank's state into the live model and engine.

    Exact resume: rank r takes rank r's saved state and random states. Re-shard: every rank
    takes the mean over the saved ranks of parameters and BN statistics, and of the momentum
    buffers (``average``) or zeros (``reset``); RNG and loss accumulators start afresh.
    Returns (communication counters, train loss sum, train loss count) to continue from.
    """
    step = checkpoint.meta.step
    if reshard is None:
        state = checkpoint.rank_state(rank)
        tensors = state.tensors
        checkpoint.restore_rng(rank)
    else:
        state = checkpoint.rank_state(0)
        tensors = {name: t.double() for name, t in state.tensors.items()}
        for other in range(1, checkpoint.meta.world_size):  # one saved rank in memory at a time
            for name, t in checkpoint.rank_state(other).tensors.items():
                tensors[name] += t.double()
        tensors = {name: (t / checkpoint.meta.world_size).to(state.tensors[name].dtype) for name, t in tensors.items()}
        if reshard == "reset":
            tensors = {name: t for name, t in tensors.items() if not name.endswith(".momentum")}
    engine.load_state(tensors, checkpoint.shared(), step)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.int_buffers.items():
            buffers[name].copy_(value)
    if reshard is None:
        return state.comm_stats, state.train_loss_sum, state.train_loss_count
    return state.comm_stats, 0.0, 0

"""Worker groups and hierarchical averaging: which ranks form a local-SGD worker, which groups
average between the worker and the whole world, and which group averages after a given step.

Every group is a block of consecutive ranks (ranks r·g … r·g + g − 1), so one group size says
everything about a level and every backend can build it the same way (``Communicator.split``).
A node is such a block when the launcher places ranks by node (Open MPI's and Slurm's default
block distribution); ``launcher.env`` checks that before ``node`` is accepted.

Levels, from the smallest group to the largest:
- the worker (``ranks_per_worker`` ranks): gradients averaged every step, so its ranks hold the
  same parameters and optimizer state at every step;
- intermediate levels (``levels``): the model averaged inside groups of ``ranks`` every
  ``sync_period`` steps;
- the world: the method's own sync (every ``algorithm.sync_period`` steps), with the outer
  optimizer and the buffer policies.
When several levels are due after a step only the largest group averages (it subsumes the
others; PyTorch's ``HierarchicalModelAverager`` rule). Level periods count from the start of
the local phase, like the global one, so warm-up and levels never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config.schema import AlgorithmConfig
from ..errors import ConfigError
from .accounting import GLOBAL

WORKER = "worker"  # the counters' name for the gradient allreduces inside a worker


@dataclass(frozen=True)
class GroupLevel:
    """Groups of ``ranks`` consecutive ranks that average the model every ``sync_period`` steps."""

    ranks: int
    sync_period: int


@dataclass(frozen=True)
class Hierarchy:
    world_size: int
    ranks_per_worker: int = 1
    levels: tuple[GroupLevel, ...] = ()

    @property
    def workers(self) -> int:
        return self.world_size // self.ranks_per_worker

    @property
    def is_flat(self) -> bool:
        """One rank per worker and no intermediate level: every rank is a local-SGD worker."""
        return self.ranks_per_worker == 1 and not self.levels

    def level_names(self) -> list[str]:
        """Names of the levels that communicate, for counters: ``worker``, ``level1``…, ``global``."""
        names = [WORKER] if self.ranks_per_worker > 1 else []
        return names + [f"level{index + 1}" for index in range(len(self.levels))] + [GLOBAL]

    def level_due(self, completed_steps: int, local_start: int | None, global_period: int) -> int | None:
        """Which intermediate level (index into ``levels``) averages after ``completed_steps``, or None:
        none is due, or the global sync (due at the same step) takes precedence."""
        if local_start is None or completed_steps <= local_start:
            return None
        local_steps = completed_steps - local_start
        if local_steps % global_period == 0:
            return None
        due = [index for index, level in enumerate(self.levels) if local_steps % level.sync_period == 0]
        return due[-1] if due else None


def check_hierarchy(
    world_size: int, ranks_per_worker: int, levels: Sequence[GroupLevel], global_period: int, where: str = "algorithm"
) -> Hierarchy:
    """The hierarchy, or a ``ConfigError`` naming the first mistake in one line."""
    if ranks_per_worker < 1:
        raise ConfigError(f"{where}.ranks_per_worker: must be >= 1, got {ranks_per_worker}")
    if world_size % ranks_per_worker:
        raise ConfigError(
            f"{where}.ranks_per_worker: {ranks_per_worker} ranks per worker do not divide the "
            f"{world_size} ranks of this run"
        )
    smaller, smaller_name, smaller_period = ranks_per_worker, f"{where}.ranks_per_worker", 0
    for index, level in enumerate(levels):
        name = f"{where}.levels[{index}]"
        if level.sync_period < 1:
            raise ConfigError(f"{name}.sync_period: must be >= 1, got {level.sync_period}")
        if level.ranks <= smaller or level.ranks % smaller:
            raise ConfigError(
                f"{name}.ranks: groups of {level.ranks} ranks must be larger than, and a multiple of, "
                f"the {smaller} of {smaller_name}"
            )
        if world_size % level.ranks or level.ranks >= world_size:
            raise ConfigError(
                f"{name}.ranks: groups of {level.ranks} ranks must divide the {world_size} ranks of "
                f"this run and be fewer (the whole world is the method's own sync)"
            )
        if level.sync_period <= smaller_period or level.sync_period >= global_period:
            raise ConfigError(
                f"{name}.sync_period: {level.sync_period} must be larger than the previous level's "
                f"({smaller_period}) and smaller than {where}.sync_period ({global_period}): a level "
                "that never averages on its own is a mistake"
            )
        smaller, smaller_name, smaller_period = level.ranks, name, level.sync_period
    return Hierarchy(world_size, ranks_per_worker, tuple(levels))


def hierarchy_from_config(cfg: AlgorithmConfig, world_size: int, ranks_per_node: int | None) -> Hierarchy:
    """The hierarchy ``cfg`` asks for in a world of ``world_size`` ranks, ``node`` standing for
    ``ranks_per_node`` (None: this run has no nodes, a simulation)."""

    def ranks(value: int | str, key: str) -> int:
        if value != "node":
            return int(value)
        if ranks_per_node is None:
            raise ConfigError(
                f"{key}: 'node' needs ranks started by a launcher; a simulation has no nodes: give a number"
            )
        return ranks_per_node

    levels = [
        GroupLevel(ranks(level.ranks, f"algorithm.levels[{index}].ranks"), level.sync_period)
        for index, level in enumerate(cfg.levels)
    ]
    return check_hierarchy(
        world_size, ranks(cfg.ranks_per_worker, "algorithm.ranks_per_worker"), levels, cfg.sync_period
    )

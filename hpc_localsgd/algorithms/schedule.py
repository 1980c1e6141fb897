"""When to communicate: one step counter drives the synchronous phase and the local phase."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import AlgorithmConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class SyncSchedule:
    """Synchronous SGD for steps [0, local_start), then model averaging every ``sync_period`` steps.

    ``local_start`` None means synchronous throughout (all-reduce SGD); 0 means local SGD
    from the first step; anything else is post-local SGD (Lin et al. 2020). Averaging
    happens after completed step s when s > local_start and (s − local_start) % H == 0,
    so the warm-up and the switch can never drift apart.

    ``outer_every`` k: the outer optimizer steps after every k-th average only (fairscale's SlowMo
    has the two periods apart); the count of averages comes from the same step counter, so a
    resumed run knows where it stands without saving it.

    ``last_step``: the run's last step (None: open-ended, as in the benchmark). A delayed sync
    (algorithms/streaming.py) whose step would come after it is not started.
    """

    sync_period: int
    local_start: int | None
    outer_every: int = 1
    last_step: int | None = None

    @classmethod
    def from_config(
        cls,
        cfg: AlgorithmConfig,
        steps_per_epoch: int,
        first_decay_step: int | None = None,
        last_step: int | None = None,
    ) -> SyncSchedule:
        """The one place that says when local SGD starts: never for all-reduce SGD, at step 0 for
        local SGD, and for post-local SGD at ``switch_step``, ``switch_epoch`` or else at the LR
        schedule's first decay (``first_decay_step``), as Lin et al. (2020) switch."""
        local_start = _local_start(cfg, steps_per_epoch, first_decay_step)
        return cls(cfg.sync_period, local_start, cfg.outer_every, last_step)

    def is_synchronous(self, step: int) -> bool:
        """Whether the gradients of step ``step`` (0-based, about to run) are averaged."""
        return self.local_start is None or step < self.local_start

    def averages_after(self, completed_steps: int) -> bool:
        """Whether the model is averaged once ``completed_steps`` optimizer steps are done."""
        if self.local_start is None or completed_steps <= self.local_start:
            return False
        return (completed_steps - self.local_start) % self.sync_period == 0

    def outer_step_after(self, completed_steps: int) -> bool:
        """Whether the average after ``completed_steps`` steps is followed by the outer step: the
        k-th, 2k-th, ... average of the local phase (k = ``outer_every``)."""
        if not self.averages_after(completed_steps):
            return False
        assert self.local_start is not None  # averages_after says the local phase has begun
        return (completed_steps - self.local_start) // self.sync_period % self.outer_every == 0


def _local_start(cfg: AlgorithmConfig, steps_per_epoch: int, first_decay_step: int | None) -> int | None:
    if cfg.method == "allreduce":
        return None
    if cfg.method == "local_sgd":
        return 0
    if cfg.switch_step is not None:
        return cfg.switch_step
    if cfg.switch_epoch is not None:
        return int(round(cfg.switch_epoch * steps_per_epoch))
    if first_decay_step is None:
        raise ConfigError(
            "algorithm.switch_epoch: post_local_sgd switches at the first LR decay by default, "
            "but optim.schedule has none; set algorithm.switch_epoch or algorithm.switch_step"
        )
    return first_decay_step

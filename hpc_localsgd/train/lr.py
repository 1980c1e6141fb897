"""The base learning rate as a pure function of the step, so that it needs no state to resume."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.schema import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Linear scaling (Goyal et al. 2017): peak = lr_per_256 × global batch / 256 (or ``optim.lr`` as
    given, as language-model recipes state it), reached by a
    linear warm-up over ``warmup_steps``; then constant, step decay (× factor at each
    milestone), or cosine or linear decay to ``floor`` (min_lr_ratio × peak) at ``total_steps``."""

    peak: float
    warmup_steps: int
    kind: str
    decay_steps: tuple[int, ...]
    decay_factor: float
    total_steps: int
    floor: float = 0.0

    @classmethod
    def from_config(cls, cfg: OptimConfig, global_batch: int, steps_per_epoch: int, total_steps: int) -> LRSchedule:
        peak = cfg.lr if cfg.lr is not None else cfg.lr_per_256 * global_batch / 256.0
        return cls(
            peak=peak,
            warmup_steps=(
                cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * steps_per_epoch))
            ),
            kind=cfg.schedule,
            decay_steps=tuple(int(round(e * steps_per_epoch)) for e in cfg.decay_epochs)
            if cfg.schedule == "step"
            else (),
            decay_factor=cfg.decay_factor,
            total_steps=total_steps,
            floor=cfg.min_lr_ratio * peak,
        )

    @property
    def first_decay_step(self) -> int | None:
        return self.decay_steps[0] if self.decay_steps else None

    def at(self, step: int) -> float:
        """The LR used by optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.peak * self.decay_factor ** sum(1 for d in self.decay_steps if step >= d)
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(step - self.warmup_steps, span)  # steps of the decay, at most span
        if self.kind == "cosine":  # with floor 0: 0.5 · peak · (1 + cos), the same bits as before the floor
            return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * done / span))
        if self.kind == "linear":
            return self.floor + (self.peak - self.floor) * (1.0 - done / span)
        return self.peak

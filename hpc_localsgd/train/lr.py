"""The base learning rate as a pure function of the step, so that it needs no state to resume."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.schema import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Linear scaling (Goyal et al. 2017): peak = lr_per_256 × global batch / 256, reached by a
    linear warm-up over ``warmup_steps``; then constant, step decay (× factor at each
    milestone) or cosine decay to zero at ``total_steps``."""

    peak: float
    warmup_steps: int
    kind: str
    decay_steps: tuple[int, ...]
    decay_factor: float
    total_steps: int

    @classmethod
    def from_config(cls, cfg: OptimConfig, global_batch: int, steps_per_epoch: int, total_steps: int) -> LRSchedule:
        return cls(
            peak=cfg.lr_per_256 * global_batch / 256.0,
            warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
            kind=cfg.schedule,
            decay_steps=tuple(int(round(e * steps_per_epoch)) for e in cfg.decay_epochs)
            if cfg.schedule == "step"
            else (),
            decay_factor=cfg.decay_factor,
            total_steps=total_steps,
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
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * self.peak * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
        return self.peak

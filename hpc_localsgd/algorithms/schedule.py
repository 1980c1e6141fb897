"""When to communicate: one step counter drives the synchronous phase and the local phase."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SyncSchedule:
    """Synchronous SGD for steps [0, local_start), then model averaging every ``sync_period`` steps.

    ``local_start`` None means synchronous throughout (all-reduce SGD); 0 means local SGD
    from the first step; anything else is post-local SGD (Lin et al. 2020). Averaging
    happens after completed step s when s > local_start and (s − local_start) % H == 0,
    so the warm-up and the switch can never drift apart.
    """

    sync_period: int
    local_start: Optional[int]

    def is_synchronous(self, step: int) -> bool:
        """Whether the gradients of step ``step`` (0-based, about to run) are averaged."""
        return self.local_start is None or step < self.local_start

    def averages_after(self, completed_steps: int) -> bool:
        """Whether the model is averaged once ``completed_steps`` optimizer steps are done."""
        if self.local_start is None or completed_steps <= self.local_start:
            return False
        return (completed_steps - self.local_start) % self.sync_period == 0

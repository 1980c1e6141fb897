"""Figures: a measured quantity with its unit, median, spread, repetitions and (maybe) a target.

A figure is computed from one value per repetition (timing.py reduces the ranks' values to one).
Ratios are taken per repetition between two quantities measured back to back in that repetition
(paired), so that slow drift of the machine (other jobs, thermal state) cancels, and their median
is reported. Nothing here needs torch: the options check streaming targets without importing it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["<=", ">="]


@dataclass(frozen=True)
class Target:
    """``median <op> value`` is the goal, e.g. ``("<=", 1.10)`` for a ratio to a floor."""

    op: Direction
    value: float

    def met_by(self, median: float) -> bool:
        return median <= self.value if self.op == "<=" else median >= self.value


@dataclass
class Figure:
    id: str
    group: str
    description: str
    unit: str
    samples: list[float]
    target: Target | None = None
    # Values measured exactly (byte counts) rather than timed: their spread is zero by construction.
    exact: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met_by(self.median)

    def spread(self) -> dict[str, float]:
        """min, max and the interquartile range (inclusive method: defined from 2 samples on)."""
        values = sorted(self.samples)
        if len(values) >= 2:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        else:
            q1 = q3 = values[0]
        return {"min": float(values[0]), "max": float(values[-1]), "q1": float(q1), "q3": float(q3)}

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "group": self.group,
            "description": self.description,
            "unit": self.unit,
            "median": self.median,
            "spread": self.spread(),
            "repetitions": len(self.samples),
            "samples": [float(v) for v in self.samples],
            "exact": self.exact,
            "target": None if self.target is None else {"op": self.target.op, "value": self.target.value},
            "met": self.met,
            "notes": list(self.notes),
        }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerators, denominators, strict=True)]

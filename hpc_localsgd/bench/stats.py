"""Figures: a measured quantity with its unit, median, spread, repetitions and (maybe) a target.

A figure is computed from one value per repetition. For anything collective the value of a
repetition is the slowest rank's (a collective, a training window or a checkpoint is done
when its last rank is done); shares are averaged over ranks. Ratios are taken per repetition
between two quantities measured back to back in that repetition (paired), so that slow drift
of the machine (other jobs, thermal state) cancels, and their median is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..comm.base import Communicator

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


def gather(comm: Communicator, values: Sequence[float]) -> torch.Tensor:
    """Every rank's ``values`` on every rank, as a (ranks × len(values)) float64 matrix.

    One summed allreduce of a matrix where each rank fills only its own row: the communicator
    interface has no gather, and this costs one small collective per phase, outside any timing.
    """
    rows = torch.zeros(comm.size, len(values), dtype=torch.float64)
    rows[comm.rank] = torch.tensor(list(values), dtype=torch.float64)
    if comm.size > 1:
        comm.allreduce_(rows, average=False)
    return rows


def slowest(comm: Communicator, values: Sequence[float]) -> list[float]:
    """Per entry, the largest value over ranks (the time at which the last rank finished)."""
    return gather(comm, values).max(dim=0).values.tolist()


def rank_mean(comm: Communicator, values: Sequence[float]) -> list[float]:
    return gather(comm, values).mean(dim=0).tolist()

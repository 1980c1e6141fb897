"""Drift between workers, measured at every global sync (cheap enough to leave on).

Consensus distance (Kong et al., ICML 2021): Ξ² = (1/m)·Σᵢ ‖xᵢ − x̄‖² over the m workers' parameters.
Since avg(xᵢ) = x̄, Ξ² = (1/m)·Σᵢ ‖xᵢ‖² − ‖x̄‖²: each worker's ‖xᵢ‖² before the average (one float64
averaged beside the model) and ‖x̄‖² after it give it exactly, without keeping xᵢ. It is reported
relative to ‖x̄‖². The difference of two nearly equal numbers loses the digits they share, so the
squared norms are summed in float64 (float32 sums would leave nothing of a relative Ξ² below about
1e-7). What remains is x̄'s own rounding to the model's dtype: for a float32 model of n parameters
it moves ‖x̄‖², hence the relative Ξ², by about 1e-7/√n, far below the drift of any real run.

The outer update Δ = x_prev − x̄ of SlowMo and outer Nesterov: its norm, and the cosine between
consecutive Δs, which falls as H and the number of workers grow (Khaled et al., NeurIPS 2025).

Parameters only: BatchNorm statistics and momentum buffers are not part of either figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CHUNK_ELEMENTS = 1 << 20  # float64 temporaries of at most 8 MB, whatever the model's size


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ over the last dimension, summed in float64: one value per row (a 0-d tensor for 1-D
    inputs; one per simulated worker for the simulated backend's stacked ``[W, n]`` storage)."""
    total = torch.zeros(a.shape[:-1], dtype=torch.float64, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(a.shape[:-1])))
    with torch.no_grad():
        for start in range(0, a.shape[-1], step):
            left = a[..., start : start + step].to(torch.float64)
            right = left if b is a else b[..., start : start + step].to(torch.float64)
            total += (left * right).sum(dim=-1)
    return total


def first_row(values: torch.Tensor) -> float:
    """The value of worker 0 (every row is the same after a sync in a simulation)."""
    return float(values.reshape(-1)[0].item())


def relative_consensus_distance(mean_squared_norm: float, averaged_squared_norm: float) -> float:
    """Ξ²/‖x̄‖² from mean_i ‖xᵢ‖² and ‖x̄‖². Ξ² ≥ 0 in exact arithmetic; rounding may leave a tiny
    negative difference when the workers agree, which is 0. NaN for an all-zero model."""
    if averaged_squared_norm <= 0.0:
        return math.nan
    return max(mean_squared_norm - averaged_squared_norm, 0.0) / averaged_squared_norm


@dataclass(frozen=True)
class SyncMeasurement:
    """What one global sync measured; ``as_row`` gives the fields of metrics.h5's ``syncs`` table."""

    consensus_distance: float  # Ξ²/‖x̄‖² just before the average
    model_norm: float  # ‖x̄‖ (so Ξ² = consensus_distance · model_norm²)
    outer_update_norm: float = math.nan  # ‖Δ‖ = ‖x_prev − x̄‖; NaN where no outer step ran
    outer_update_cosine: float = math.nan  # cos(Δ, previous Δ); NaN at the first outer step
    outer_step: bool = False

    def as_row(self) -> dict[str, float]:
        return {
            "consensus_distance": self.consensus_distance,
            "model_norm": self.model_norm,
            "outer_update_norm": self.outer_update_norm,
            "outer_update_cosine": self.outer_update_cosine,
            "outer_step": int(self.outer_step),
        }


@dataclass
class UpdateFigures:
    """Float64 sums of one flat group's outer update: ‖Δ‖², ⟨Δ, Δ_prev⟩ and ‖Δ_prev‖² (the last two
    NaN without a previous Δ). Summed over groups, they give the whole model's norm and cosine."""

    squared_norm: float
    dot_previous: float = math.nan
    previous_squared_norm: float = math.nan


def combine_update_figures(groups: list[UpdateFigures]) -> tuple[float, float]:
    """(‖Δ‖, cos(Δ, Δ_prev)) of the whole model from its groups' sums; NaN, NaN for none."""
    if not groups:
        return math.nan, math.nan
    squared = sum(g.squared_norm for g in groups)
    previous = sum(g.previous_squared_norm for g in groups)
    dot = sum(g.dot_previous for g in groups)
    denominator = math.sqrt(squared * previous)
    cosine = dot / denominator if denominator > 0 else math.nan
    return math.sqrt(squared), cosine

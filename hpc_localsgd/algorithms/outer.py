"""Outer optimizers: what a sync does with the averaged model.

Each acts on flat parameter storage: ``averaged`` holds x̄ = avg_i x⁽ⁱ⁾ on entry and the new
model on exit; ``anchor`` holds the model after the previous sync, x_prev, and is updated to
the new model. The formulas are rearranged as ``x_new = x̄ + (1 − lr)·Δ − …`` with
Δ = x_prev − x̄ so that the plain-average special cases (SlowMo with α = 1, β = 0) give x̄
bit for bit.

The momentum-based ones also measure Δ for the drift figures (``algorithms/drift.py``): its norm
and its cosine with the previous outer step's Δ, which they keep (one more parameter-sized copy,
part of their checkpointed state so that a resumed run measures the same cosine).

Each class declares its ``spec``, its entry of ``config.schema.OUTER_METHODS``: the name
``algorithm.outer`` gives it, the settings its constructor takes, and how the start-up line and the
report name it. The spec is data in the configuration, below this module, so that the schema checks
the names and the report (which imports no torch) labels runs without the maths. ``OUTER_OPTIMIZERS``
maps the names to the classes; ``build_outer_optimizer`` builds the one a configuration names. A new
outer optimizer is its name, settings and spec in config/schema.py, a class here and its line in
``OUTER_OPTIMIZERS``; tests/unit/test_outer_registry.py fails until they agree.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from ..config.schema import OUTER_METHODS, AlgorithmConfig, OuterSpec
from .drift import UpdateFigures, combine_update_figures, first_row, row_dot


class OuterOptimizer(abc.ABC):
    """What a sync does with the averaged model."""

    spec: ClassVar[OuterSpec]
    needs_anchor = False

    @classmethod
    def from_config(cls, cfg: AlgorithmConfig) -> OuterOptimizer:
        """Built from the settings its spec names, in the spec's order."""
        return cls(*(getattr(cfg, setting) for setting, _ in cls.spec.settings))

    @abc.abstractmethod
    def step(self, averaged: torch.Tensor, anchor: torch.Tensor | None, lr: float, index: int) -> None:
        """Update ``averaged`` (group ``index`` of the flat storage) into the new model in place."""

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The outer optimizer's state, per flat group, identical on every rank."""
        return {}

    def load_state_tensors(self, state: dict[str, list[torch.Tensor]]) -> None:
        return None

    def update_figures(self) -> tuple[float, float]:
        """(‖Δ‖, cos(Δ, previous Δ)) of the last outer step over all groups; NaN where not measured."""
        return combine_update_figures([])

    def forget_update_figures(self) -> None:
        """Before a sync that steps only some parts (fragments): the figures then cover those parts."""
        return None


class PlainAverage(OuterOptimizer):
    """Plain model averaging: x ← x̄ (local SGD)."""

    spec = OUTER_METHODS["none"]

    def step(self, averaged: torch.Tensor, anchor: torch.Tensor | None, lr: float, index: int) -> None:
        return None


class _MomentumOuter(OuterOptimizer):
    needs_anchor = True

    def __init__(self) -> None:
        self.momentum: dict[int, torch.Tensor] = {}
        self.previous_update: dict[int, torch.Tensor] = {}  # Δ of the last outer step, per group
        self._figures: dict[int, UpdateFigures] = {}

    def _buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if index not in self.momentum:
            # fp32 even for low-precision models: the slow momentum accumulates small differences.
            self.momentum[index] = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
        return self.momentum[index]

    def _measure(self, index: int, delta: torch.Tensor) -> None:
        """‖Δ‖² and ⟨Δ, Δ_prev⟩ in float64 (identical rows in a simulation: worker 0's), then Δ
        becomes the next outer step's Δ_prev."""
        squared = first_row(row_dot(delta, delta))
        previous = self.previous_update.get(index)
        if previous is None:
            self._figures[index] = UpdateFigures(squared)
            self.previous_update[index] = delta.clone()
            return
        dot, previous_squared = first_row(row_dot(delta, previous)), first_row(row_dot(previous, previous))
        self._figures[index] = UpdateFigures(squared, dot, previous_squared)
        previous.copy_(delta)

    def update_figures(self) -> tuple[float, float]:
        return combine_update_figures([self._figures[i] for i in sorted(self._figures)])

    def forget_update_figures(self) -> None:
        self._figures = {}

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        state = {"momentum": [self.momentum[i] for i in sorted(self.momentum)]}
        if self.previous_update:
            state["previous_update"] = [self.previous_update[i] for i in sorted(self.previous_update)]
        return state

    def load_state_tensors(self, state: dict[str, list[torch.Tensor]]) -> None:
        self.momentum = {i: t.clone() for i, t in enumerate(state.get("momentum", []))}
        self.previous_update = {i: t.clone() for i, t in enumerate(state.get("previous_update", []))}


class SlowMo(_MomentumOuter):
    """SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020), with γ the base LR in force at the sync:

    u ← β·u + (x_prev − x̄)/γ
    x_new = x_prev − α·γ·u   =   x̄ + (1 − α)·Δ − α·β·γ·u_old
    """

    spec = OUTER_METHODS["slowmo"]

    def __init__(self, slow_lr: float, slow_momentum: float) -> None:
        super().__init__()
        self.slow_lr = slow_lr
        self.slow_momentum = slow_momentum

    def step(self, averaged: torch.Tensor, anchor: torch.Tensor | None, lr: float, index: int) -> None:
        assert anchor is not None and lr > 0
        alpha, beta = self.slow_lr, self.slow_momentum
        u = self._buffer(index, averaged)
        delta = anchor.sub_(averaged)  # the anchor's storage now holds Δ; it is rewritten below
        averaged.add_(delta, alpha=1.0 - alpha).add_(u.to(averaged.dtype), alpha=-alpha * beta * lr)
        u.mul_(beta).add_(delta.to(u.dtype), alpha=1.0 / lr)
        self._measure(index, delta)
        anchor.copy_(averaged)


class OuterNesterov(_MomentumOuter):
    """Outer Nesterov SGD on the outer gradient Δ = x_prev − x̄ (DiLoCo, Douillard et al. 2023),
    in PyTorch's Nesterov convention:

        b ← μ·b + Δ
        x_new = x_prev − η·(Δ + μ·b)   =   x̄ + (1 − η)·Δ − η·μ·b
    """

    spec = OUTER_METHODS["nesterov"]

    def __init__(self, outer_lr: float, outer_momentum: float) -> None:
        super().__init__()
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum

    def step(self, averaged: torch.Tensor, anchor: torch.Tensor | None, lr: float, index: int) -> None:
        assert anchor is not None
        eta, mu = self.outer_lr, self.outer_momentum
        b = self._buffer(index, averaged)
        delta = anchor.sub_(averaged)
        b.mul_(mu).add_(delta.to(b.dtype))
        averaged.add_(delta, alpha=1.0 - eta).add_(b.to(averaged.dtype), alpha=-eta * mu)
        self._measure(index, delta)
        anchor.copy_(averaged)


# Every outer optimizer by its ``algorithm.outer`` name, in the order of ``OUTER_METHODS``.
OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {
    cls.spec.name: cls for cls in (PlainAverage, SlowMo, OuterNesterov)
}


def build_outer_optimizer(cfg: AlgorithmConfig) -> OuterOptimizer:
    """The outer optimizer ``cfg.outer`` names, with its settings from ``cfg``."""
    return OUTER_OPTIMIZERS[cfg.outer].from_config(cfg)

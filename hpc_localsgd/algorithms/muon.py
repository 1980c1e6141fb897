"""Muon for the hidden weight matrices and AdamW for every other parameter, as one inner optimizer.

Muon (Jordan et al., "Muon: an optimizer for hidden layers in neural networks", 2024) keeps a momentum
buffer B per matrix: B ← μ·B + (1 − μ)·g; the update is its Nesterov form g + μ·(B − g), orthogonalised
by five Newton–Schulz iterations in bfloat16, scaled by √max(1, rows/cols), after decoupled weight decay
x ← (1 − lr·λ)·x. The embeddings, the output head, norms and biases are not hidden matrices: AdamW
(Loshchilov and Hutter 2019) steps them, as MuLoCo and modded-nanogpt split a model. One optimizer holds
both, as tagged param groups, so that the engine, the flat storage and checkpoints see one optimizer,
whose state the registry (optimizer_state.py) names per group. Muon's learning rate is ``lr_ratio`` times
the schedule's, which the engine sets on every group at every step.

The arithmetic is PyTorch's own: its Newton–Schulz iteration (torch.optim.Muon's) and its functional
AdamW, so a rank's step equals theirs. A simulated backend stacks each matrix over its workers
([W, rows, cols]); each worker's matrix is orthogonalised by itself, as on a rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz
from torch.optim.adamw import adamw


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        matrices: Iterable[torch.Tensor],
        rest: Iterable[torch.Tensor],
        *,
        lr: float,
        muon_lr_ratio: float,
        muon_momentum: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        groups: list[dict[str, Any]] = [
            {"params": list(matrices), "use_muon": True, "lr_ratio": muon_lr_ratio, "momentum": muon_momentum},
            {"params": list(rest), "use_muon": False, "lr_ratio": 1.0, "betas": betas, "eps": eps},
        ]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr = group["lr"] * group["lr_ratio"]
            if group["use_muon"]:
                for p in params:
                    self._muon_step(p, lr, group["momentum"], group["weight_decay"])
            elif params:
                self._adamw_step(params, lr, group)
        return loss

    def _muon_step(self, p: torch.Tensor, lr: float, momentum: float, weight_decay: float) -> None:
        grad = p.grad
        assert grad is not None
        buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
        buffer.lerp_(grad, 1 - momentum)
        update = orthogonalise(grad.lerp(buffer, momentum))
        rows, cols = p.shape[-2:]
        p.mul_(1 - lr * weight_decay)
        p.add_(update, alpha=-lr * math.sqrt(max(1, rows / cols)))

    def _adamw_step(self, params: list[torch.Tensor], lr: float, group: dict[str, Any]) -> None:
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "exp_avg" not in state:  # lazily, as PyTorch's AdamW (the engine's flat storage starts them)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],  # type: ignore[misc]
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def orthogonalise(update: torch.Tensor) -> torch.Tensor:
    """PyTorch's Newton–Schulz orthogonalisation of a matrix; of each worker's, where stacked."""
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    if update.dim() == 2:
        return _zeropower_via_newtonschulz(update, coefficients, DEFAULT_NS_STEPS, EPS)
    return torch.stack([orthogonalise(row) for row in update])

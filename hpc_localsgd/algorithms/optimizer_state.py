"""The inner optimizers the package supports: how each is built from the config, and what it keeps, as data.

An optimizer's per-parameter tensors (SGD's and Muon's momentum buffers, AdamW's two moments) live in the
flat storage beside the parameters, so that averaging them is part of the sync's one collective and a
checkpoint saves them as one slice; its scalar state (a step count) is saved beside them. Flat storage,
checkpoints and re-shard, the ``optimizer_state`` policy at a sync (keep | average | reset) and the test
reference all read this registry, and an optimizer that is not in it is refused when the engine is built:
its state would otherwise be silently left out of checkpoints and of the policy. The test of this module
checks that every tensor of ``optimizer.state_dict()`` of each registered optimizer reaches a checkpoint
and comes back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config.schema import OptimConfig
from ..errors import ConfigError
from .muon import MuonWithAdamW


@dataclass(frozen=True)
class OptimizerState:
    """The state one inner optimizer keeps per parameter.

    tensors        state key → the flat segment that holds it (named as checkpoints name it)
    scalars        state keys of per-parameter scalars (saved beside the flat storage)
    kept           the keys (of both) a param group keeps: SGD without momentum none; an optimizer
                   whose groups differ (Muon for matrices, AdamW for the rest) some of them
    unsupported    why a param group cannot keep its state in flat storage (None: it can)
    """

    tensors: Mapping[str, str]
    scalars: tuple[str, ...]
    kept: Callable[[Mapping[str, Any]], tuple[str, ...]]
    unsupported: Callable[[Mapping[str, Any]], str | None]


def _sgd_kept(group: Mapping[str, Any]) -> tuple[str, ...]:
    return ("momentum_buffer",) if group.get("momentum", 0.0) > 0.0 else ()


def _sgd_unsupported(group: Mapping[str, Any]) -> str | None:
    # A zero buffer gives buf = μ·0 + (1 − dampening)·g at the first step, PyTorch's lazy start is buf = g:
    # the same only without dampening.
    if _sgd_kept(group) and group.get("dampening", 0.0) != 0.0:
        return "flat momentum buffers require dampening == 0"
    return None


# The flat segment of SGD's momentum buffers; its name is part of the checkpoint format ("flat0.momentum").
MOMENTUM = "momentum"


def _adamw_kept(group: Mapping[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "step")


def _muon_kept(group: Mapping[str, Any]) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["use_muon"] else _adamw_kept(group)


def _never(group: Mapping[str, Any]) -> str | None:
    return None


def _adamw_unsupported(group: Mapping[str, Any]) -> str | None:
    if group.get("amsgrad"):
        return "adamw with amsgrad keeps a third moment the package does not hold: turn amsgrad off"
    if group.get("fused") or group.get("capturable"):
        return "adamw's fused and capturable variants keep their step counts on the device: use the default"
    return None


OPTIMIZER_STATES: dict[type[torch.optim.Optimizer], OptimizerState] = {
    torch.optim.SGD: OptimizerState({"momentum_buffer": MOMENTUM}, (), _sgd_kept, _sgd_unsupported),
    # Adam's moments start at zero as PyTorch starts them; its step count is per parameter and per rank.
    torch.optim.AdamW: OptimizerState(
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, ("step",), _adamw_kept, _adamw_unsupported
    ),
    # Muon's momentum for the hidden matrices (in SGD's segment), AdamW's state for the rest.
    MuonWithAdamW: OptimizerState(
        {"momentum_buffer": MOMENTUM, "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, ("step",), _muon_kept, _never
    ),
}

# Every flat segment of optimizer state any registered optimizer keeps, in layout order.
STATE_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for s in OPTIMIZER_STATES.values() for k in s.tensors.values()))


def optimizer_state_of(optimizer: torch.optim.Optimizer) -> OptimizerState:
    """The registry's entry for ``optimizer``, or a ValueError naming it."""
    state = OPTIMIZER_STATES.get(type(optimizer))
    if state is None:
        known = ", ".join(sorted(t.__name__ for t in OPTIMIZER_STATES))
        raise ValueError(
            f"inner optimizer {type(optimizer).__name__} has no registered state (known: {known}); "
            "its state would be lost in checkpoints"
        )
    for group in optimizer.param_groups:
        why = state.unsupported(group)
        if why is not None:
            raise ValueError(why)
    return state


def stateful_parameters(optimizer: torch.optim.Optimizer, key: str) -> list[torch.Tensor]:
    """The parameters that keep state ``key``, in param-group order."""
    state = optimizer_state_of(optimizer)
    return [p for group in optimizer.param_groups if key in state.kept(group) for p in group["params"]]


def scalar_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A snapshot of the per-parameter scalars (``optimizer.<key>``, one float64 per stateful parameter), for
    a checkpoint; a parameter that has not stepped yet has 0."""
    state = optimizer_state_of(optimizer)
    return {
        f"optimizer.{key}": torch.tensor(
            [float(optimizer.state[p].get(key, 0.0)) for p in stateful_parameters(optimizer, key)],
            dtype=torch.float64,
        )
        for key in state.scalars
    }


def load_scalar_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, torch.Tensor]) -> None:
    """Put saved per-parameter scalars back (as 0-d float32 tensors, as PyTorch keeps a step count)."""
    state = optimizer_state_of(optimizer)
    for key in state.scalars:
        values = saved.get(f"optimizer.{key}")
        if values is None:
            continue
        for p, value in zip(stateful_parameters(optimizer, key), values.tolist(), strict=True):
            optimizer.state[p][key] = torch.tensor(value, dtype=torch.float32)


def make_inner_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float, hidden_matrices: Sequence[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    """The optimizer every worker steps between syncs (``optim.name``), at learning rate ``lr`` until the
    engine sets each step's. ``hidden_matrices``: the parameters Muon steps (the model says which)."""
    if cfg.name == "muon":
        if not hidden_matrices:
            raise ConfigError(
                "optim.name: muon steps hidden weight matrices (linear layers before the output head), and this "
                "model has none: use adamw"
            )
        matrices = {id(p) for p in hidden_matrices}
        params = list(params)
        return MuonWithAdamW(
            [p for p in params if id(p) in matrices],
            [p for p in params if id(p) not in matrices],
            lr=lr,
            muon_lr_ratio=cfg.value("muon_lr_ratio"),
            muon_momentum=cfg.value("muon_momentum"),
            betas=(cfg.value("beta1"), cfg.value("beta2")),
            eps=cfg.value("eps"),
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.value("beta1"), cfg.value("beta2")),
            eps=cfg.value("eps"),
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.value("momentum"), nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def start_scalar_state(optimizer: torch.optim.Optimizer) -> None:
    """Give each stateful parameter its scalar state at zero (a 0-d float32 tensor, as PyTorch keeps a step
    count): an optimizer whose state is not empty skips its own lazy start, which would otherwise replace
    the flat storage's views."""
    state = optimizer_state_of(optimizer)
    for key in state.scalars:
        for p in stateful_parameters(optimizer, key):
            optimizer.state[p].setdefault(key, torch.tensor(0.0, dtype=torch.float32))

"""An independent reference for the averaging algorithms: W workers simulated in one process.

Written straight from ../shared/ALGORITHMS.md, per tensor and without the package's flat
buffers, gradient buckets or rearranged formulas, so that agreement with the package is
evidence rather than tautology. Workers use PyTorch's own SGD (with its lazy momentum).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpc_localsgd.config.schema import AlgorithmConfig


@dataclass
class ReferenceAlgorithm:
    sync_period: int = 1
    local_start: int | None = 0  # None: synchronous throughout
    outer: str = "none"  # none | slowmo | nesterov
    slow_lr: float = 1.0
    slow_momentum: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    momentum_buffers: str = "keep"  # keep | average | reset
    average_bn_buffers: bool = True
    ranks_per_worker: int = 1  # consecutive ranks that average gradients every local step
    levels: tuple[tuple[int, int], ...] = ()  # (group size, period): model averages inside groups
    outer_every: int = 1  # the outer step after every k-th global average only (fairscale's SlowMo)

    @classmethod
    def from_config(
        cls,
        cfg: AlgorithmConfig,
        local_start: int | None,
        ranks_per_worker: int = 1,
        levels: tuple[tuple[int, int], ...] = (),
    ) -> ReferenceAlgorithm:
        """The algorithm a config section asks for; ``node`` already replaced by numbers by the caller."""
        return cls(
            sync_period=cfg.sync_period,
            local_start=local_start,
            outer=cfg.outer,
            slow_lr=cfg.slow_lr,
            slow_momentum=cfg.slow_momentum,
            outer_lr=cfg.outer_lr,
            outer_momentum=cfg.outer_momentum,
            momentum_buffers=cfg.momentum_buffers,
            average_bn_buffers=cfg.average_bn_buffers,
            ranks_per_worker=ranks_per_worker,
            levels=levels,
            outer_every=cfg.outer_every,
        )


def _groups(size: int, ranks: int) -> list[range]:
    return [range(start, start + ranks) for start in range(0, size, ranks)]


def simulate(
    initial: torch.nn.Module,
    algo: ReferenceAlgorithm,
    batches: Sequence[Sequence[tuple]],
    lr_at: Callable[[int], float],
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    record: list[dict[str, float]] | None = None,
) -> list[torch.nn.Module]:
    """Train ``len(batches)`` workers; ``batches[i][s]`` is worker i's (x, y) at step s.

    ``record``: one dict per global sync is appended, measured directly (float64, parameters only):
    ``step``; ``consensus_distance``, the mean over workers of ‖x_w − x̄‖² over ‖x̄‖² (a worker of
    several ranks counted once); ``outer_update_norm`` ‖Δ‖ and ``outer_update_cosine`` cos(Δ, Δ of
    the previous outer step), NaN without an outer step (the cosine also at the first)."""
    workers = [copy.deepcopy(initial) for _ in batches]
    opts = [
        torch.optim.SGD(w.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        for w in workers
    ]
    steps = len(batches[0])
    x_prev: list[torch.Tensor] = []
    slow_u: list[torch.Tensor] = []
    previous_delta: list[torch.Tensor] = []
    for s in range(steps):
        lr = lr_at(s)
        synchronous = algo.local_start is None or s < algo.local_start
        if s == algo.local_start and algo.outer != "none":
            x_prev = [p.detach().clone() for p in workers[0].parameters()]
            slow_u = [torch.zeros_like(p) for p in x_prev]
        for w, opt, wb in zip(workers, opts, batches, strict=True):
            opt.zero_grad()
            x, y = wb[s]
            F.cross_entropy(w(x), y).backward()
        # Synchronous phase: gradients averaged over all ranks; local phase: inside each worker.
        for group in _groups(len(workers), len(workers) if synchronous else algo.ranks_per_worker):
            for params in zip(*(workers[r].parameters() for r in group), strict=True):
                g = sum(p.grad for p in params) / len(params)
                for p in params:
                    p.grad = g.clone()
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        done = s + 1
        if synchronous or algo.local_start is None:
            continue
        local_steps = done - algo.local_start
        if local_steps % algo.sync_period != 0:
            # Not a global sync: the largest group whose period has come averages its members' models.
            due = [ranks for ranks, period in algo.levels if local_steps % period == 0]
            if due:
                _average_inside_groups(workers, opts, due[-1], algo)
            continue
        # The outer step after the k-th, 2k-th, ... average; between them a plain average, x_prev kept.
        outer_step = algo.outer != "none" and (local_steps // algo.sync_period) % algo.outer_every == 0
        with torch.no_grad():
            # x̄ = avg_i x⁽ⁱ⁾
            averaged = [sum(ps) / len(ps) for ps in zip(*(w.parameters() for w in workers), strict=True)]
            if record is not None:
                entry = {"step": float(done), **_consensus(workers, algo.ranks_per_worker)}
                if outer_step:
                    outer_delta = [(x - avg).double() for x, avg in zip(x_prev, averaged, strict=True)]
                    entry.update(_update_figures(outer_delta, previous_delta))
                    previous_delta = outer_delta
                record.append(entry)
            if outer_step and algo.outer == "slowmo":
                # u ← β·u + (x_prev − x̄)/γ ;  x ← x_prev − α·γ·u
                for i, avg in enumerate(averaged):
                    slow_u[i] = algo.slow_momentum * slow_u[i] + (x_prev[i] - avg) / lr
                    averaged[i] = x_prev[i] - algo.slow_lr * lr * slow_u[i]
                    x_prev[i] = averaged[i].clone()
            elif outer_step and algo.outer == "nesterov":
                # Δ = x_prev − x̄ ; b ← μ·b + Δ ; x ← x_prev − η·(Δ + μ·b)
                for i, avg in enumerate(averaged):
                    delta = x_prev[i] - avg
                    slow_u[i] = algo.outer_momentum * slow_u[i] + delta
                    averaged[i] = x_prev[i] - algo.outer_lr * (delta + algo.outer_momentum * slow_u[i])
                    x_prev[i] = averaged[i].clone()
            for w in workers:
                for p, avg in zip(w.parameters(), averaged, strict=True):
                    p.copy_(avg)
            if algo.average_bn_buffers:
                for bufs in zip(*(w.buffers() for w in workers), strict=True):
                    if bufs[0].is_floating_point():
                        mean = sum(bufs) / len(bufs)
                        for b in bufs:
                            b.copy_(mean)
            if algo.momentum_buffers != "keep":
                states = [
                    [opt.state[p].get("momentum_buffer") for p in w.parameters()]
                    for w, opt in zip(workers, opts, strict=True)
                ]
                for bufs in zip(*states, strict=True):
                    if bufs[0] is None:
                        continue
                    new = sum(bufs) / len(bufs) if algo.momentum_buffers == "average" else torch.zeros_like(bufs[0])
                    for b in bufs:
                        b.copy_(new)
    return workers


def _flat64(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _consensus(workers: list[torch.nn.Module], ranks_per_worker: int) -> dict[str, float]:
    """Ξ²/‖x̄‖² = mean_w ‖x_w − x̄‖² / ‖x̄‖² over the workers (rank 0 of each), straight from the definition."""
    xs = [_flat64(workers[group[0]]) for group in _groups(len(workers), ranks_per_worker)]
    mean = sum(xs) / len(xs)
    spread = sum(float(((x - mean) ** 2).sum()) for x in xs) / len(xs)
    return {"consensus_distance": spread / float((mean**2).sum()), "model_norm": float(mean.norm())}


def _update_figures(delta: list[torch.Tensor], previous: list[torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([d.reshape(-1) for d in delta])
    cosine = float("nan")
    if previous:
        before = torch.cat([d.reshape(-1) for d in previous])
        cosine = float(flat @ before / (flat.norm() * before.norm()))
    return {"outer_update_norm": float(flat.norm()), "outer_update_cosine": cosine}


def _average_inside_groups(
    workers: list[torch.nn.Module], opts: list[torch.optim.Optimizer], ranks: int, algo: ReferenceAlgorithm
) -> None:
    """x⁽ⁱ⁾ ← mean of x over i's group, for parameters and, as configured, BN statistics and momentum."""
    with torch.no_grad():
        for group in _groups(len(workers), ranks):
            members = [workers[r] for r in group]
            tensors = [list(w.parameters()) for w in members]
            if algo.average_bn_buffers:
                for i, w in enumerate(members):
                    tensors[i] += [b for b in w.buffers() if b.is_floating_point()]
            if algo.momentum_buffers == "average":
                for i, r in enumerate(group):
                    tensors[i] += [
                        opts[r].state[p]["momentum_buffer"]
                        for p in workers[r].parameters()
                        if opts[r].state[p].get("momentum_buffer") is not None
                    ]
            for same in zip(*tensors, strict=True):
                mean = sum(same) / len(same)
                for t in same:
                    t.copy_(mean)

"""An independent reference for the averaging algorithms: W workers simulated in one process.

Written straight from the published update rules (the papers cited in the package's docstrings),
per tensor and without the package's flat
buffers, gradient buckets or rearranged formulas, so that agreement with the package is
evidence rather than tautology. Workers use PyTorch's own SGD (with its lazy momentum).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms.optimizer_state import OPTIMIZER_STATES
from hpc_localsgd.config.schema import AlgorithmConfig, OptimConfig
from tests.compression_reference import compressed_average


@dataclass
class ReferenceAlgorithm:
    sync_period: int = 1
    local_start: int | None = 0  # None: synchronous throughout
    outer: str = "none"  # none | slowmo | nesterov
    slow_lr: float = 1.0
    slow_momentum: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    optimizer_state: str = "keep"  # keep | average | reset: the inner optimizer's per-parameter state
    average_bn_buffers: bool = True
    ranks_per_worker: int = 1  # consecutive ranks that average gradients every local step
    levels: tuple[tuple[int, int], ...] = ()  # (group size, period): model averages inside groups
    outer_every: int = 1  # the outer step after every k-th global average only (fairscale's SlowMo)
    # Streaming DiLoCo and compressed syncs (docs/algorithms.md, "Compressed, overlapped and fragmented syncs"):
    sync_delay: int = 0  # τ: a fragment's Δ = x_prev − x is taken τ steps before its sync
    sync_mix: float = 0.0  # α: after a sync, x ← (1 − α)·x_g + α·x_now
    fragments: int = 1  # F contiguous fragments of the flat parameters, fragment f offset by f·H/F
    compression: str = "none"  # what Δ is sent as: none | bf16 | fp16 | int8 (tests/compression_reference.py)
    error_feedback: bool = False
    gradient_compression: str = "none"  # what a synchronous step's gradients are sent as: none | bf16 | fp16
    last_step: int | None = None  # the run's last step: no delayed sync is started for after it (None: open)

    @property
    def streaming(self) -> bool:
        return self.sync_delay > 0 or self.fragments > 1 or self.compression != "none"

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
            optimizer_state=cfg.optimizer_state,
            average_bn_buffers=cfg.average_bn_buffers,
            ranks_per_worker=ranks_per_worker,
            levels=levels,
            outer_every=cfg.outer_every,
            sync_delay=cfg.sync_delay,
            sync_mix=cfg.sync_mix,
            fragments=cfg.fragments,
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
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
    clip_grad_norm: float | None = None,
    departures: dict[int, int] | None = None,
    returns: dict[int, tuple[int, int]] | None = None,
) -> list[torch.nn.Module]:
    """Train ``len(batches)`` workers; ``batches[i][s]`` is worker i's (x, y) at step s.

    ``departures``: rank i → the completed step of the first global sync (or synchronous step) it misses; from
    then on, the average is over the ranks still present (x̄ = (1/|S|)·Σ_{i∈S} xᵢ) and rank i trains no more (its
    returned model is where it stopped). Not with streaming syncs or levels. ``returns``: rank i →
    (s, d): after the sync at completed step s, rank i is present again as a copy of rank d (parameters, buffers,
    optimizer state) and trains on from its own batches of step s.

    ``record``: one dict per global sync is appended, measured directly (float64, parameters only):
    ``step``; ``consensus_distance``, the mean over workers of ‖x_w − x̄‖² over ‖x̄‖² (a worker of
    several ranks counted once); ``outer_update_norm`` ‖Δ‖ and ``outer_update_cosine`` cos(Δ, Δ of
    the previous outer step), NaN without an outer step (the cosine also at the first). ``make_optimizer``:
    each worker's inner optimizer (PyTorch's own, lazily started), SGD with the arguments above if None.
    ``clip_grad_norm``: each worker's gradient clipped to that norm after averaging (PyTorch's own clip)."""
    workers = [copy.deepcopy(initial) for _ in batches]
    opts = [
        make_optimizer(w)
        if make_optimizer is not None
        else torch.optim.SGD(
            w.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
        for w in workers
    ]
    steps = len(batches[0])
    stream = _Stream(algo, record) if algo.streaming else None
    x_prev: list[torch.Tensor] = []
    slow_u: list[torch.Tensor] = []
    previous_delta: list[torch.Tensor] = []
    departures = departures or {}
    present, departed = list(range(len(workers))), set()
    for s in range(steps):
        lr = lr_at(s)
        synchronous = algo.local_start is None or s < algo.local_start
        if synchronous:  # every step averages: a departure takes effect at the step it names
            leaving = {i for i in present if departures.get(i, steps + 1) <= s + 1 and i not in departed}
            departed |= leaving
            present = [i for i in present if i not in leaving]
        if s == algo.local_start and algo.outer != "none":
            x_prev = [p.detach().clone() for p in workers[0].parameters()]
            slow_u = [torch.zeros_like(p) for p in x_prev]
        if s == algo.local_start and stream is not None:
            stream.start(workers)
        for i, (w, opt, wb) in enumerate(zip(workers, opts, batches, strict=True)):
            if i not in present:
                continue
            opt.zero_grad()
            x, y = wb[s]
            out = w(x)  # [batch, classes], or a language model's [batch, positions, vocab]
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        # Synchronous phase: gradients averaged over all ranks; local phase: inside each worker.
        for group in _groups(len(workers), len(workers) if synchronous else algo.ranks_per_worker):
            group = [r for r in group if r in present]
            for params in zip(*(workers[r].parameters() for r in group), strict=True):
                if synchronous and algo.gradient_compression != "none":  # no error feedback
                    grads = [p.grad.detach().numpy().ravel() for p in params]
                    average = compressed_average(algo.gradient_compression, grads, None)[0]
                    g = torch.from_numpy(average).reshape(params[0].shape)
                else:
                    g = sum(p.grad for p in params) / len(params)
                for p in params:
                    p.grad = g.clone()
        if clip_grad_norm is not None:
            for w in workers:
                torch.nn.utils.clip_grad_norm_(list(w.parameters()), clip_grad_norm)
        for i, opt in enumerate(opts):
            if i not in present:
                continue
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        done = s + 1
        if synchronous or algo.local_start is None:
            continue
        local_steps = done - algo.local_start
        if stream is not None:
            stream.after_step(done, workers, opts, lr)
        if stream is not None or local_steps % algo.sync_period != 0:
            # Not a global sync: the largest group whose period has come averages its members' models.
            due = [ranks for ranks, period in algo.levels if local_steps % period == 0]
            if due and local_steps % algo.sync_period != 0:
                _average_inside_groups(workers, opts, due[-1], algo)
            continue
        # The outer step after the k-th, 2k-th, ... average; between them a plain average, x_prev kept.
        outer_step = algo.outer != "none" and (local_steps // algo.sync_period) % algo.outer_every == 0
        leaving = {i for i in present if departures.get(i, steps + 1) <= done and i not in departed}
        departed |= leaving
        present = [i for i in present if i not in leaving]
        synced = [workers[i] for i in present]
        with torch.no_grad():
            # x̄ = avg_i x⁽ⁱ⁾ over the workers present
            averaged = [sum(ps) / len(ps) for ps in zip(*(w.parameters() for w in synced), strict=True)]
            if record is not None:
                entry = {"step": float(done), **_consensus(synced, algo.ranks_per_worker)}
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
            for w in synced:
                for p, avg in zip(w.parameters(), averaged, strict=True):
                    p.copy_(avg)
        _average_bn_and_momentum(synced, [opts[i] for i in present], algo)
        for rank, (step, donor) in (returns or {}).items():
            if step == done:
                _copy_worker(workers[donor], opts[donor], workers[rank], opts[rank])
                present = sorted({*present, rank})
    return workers


def _copy_worker(
    source: torch.nn.Module,
    source_opt: torch.optim.Optimizer,
    target: torch.nn.Module,
    target_opt: torch.optim.Optimizer,
) -> None:
    """``target`` becomes ``source``: parameters, every buffer, and the optimizer's per-parameter state."""
    with torch.no_grad():
        for to, frm in zip(target.parameters(), source.parameters(), strict=True):
            to.copy_(frm)
            target_opt.state[to] = {k: v.clone() if torch.is_tensor(v) else v for k, v in source_opt.state[frm].items()}
        for to, frm in zip(target.buffers(), source.buffers(), strict=True):
            to.copy_(frm)


class _Stream:
    """Delayed, fragmented and compressed global syncs over the workers' flat parameter vectors:

    fragment f (contiguous part f of F of the flat parameters, the first n % F parts one longer) syncs
    after completed steps c with c − local_start − f·H/F ≥ 0 a multiple of H and c − τ > local_start;
    its Δ_w = x_prev − x_w is taken after step c − τ (before that step's own sync, where τ = H) and
    averaged (as Q(Δ_w + e_w) when compressed); with τ = H, x_w ← (1 − α)·x_prev + α·x_w after the
    first Δ, as after a sync of a zero average;
    at c: x̄ = x_prev − avg, the outer step on the fragment (on its k-th, 2k-th, ... sync), x_prev ← x_g,
    x_w ← (1 − α)·x_g + α·x_w. BN statistics and the momentum policy act at fragment 0's syncs.
    A Δ whose sync would come after the run's last step is not taken below τ = H; at τ = H it is taken and
    applied at once, after the sync due.
    Workers of R ranks: the average is over the workers (rank 0 of each), and a compressed one is taken
    shard by shard (R contiguous shards of the fragment, the first n % R one longer), each shard with its
    own error state, as rank j of every worker averages shard j."""

    def __init__(self, algo: ReferenceAlgorithm, record: list[dict[str, float]] | None = None) -> None:
        self.algo = algo
        # Per applied fragment: the consensus distance of the workers' x as their Δ was taken, over the
        # fragment, straight from the definition: mean_w ‖x_w − x̄‖² / ‖x̄‖² with x̄ their exact mean.
        self.record = record
        self.taken: dict[int, list[torch.Tensor]] = {}
        self.x_prev: torch.Tensor | None = None
        self.slow: torch.Tensor | None = None  # SlowMo's u or Nesterov's b, flat
        self.pending: dict[int, torch.Tensor] = {}
        self.errors: dict[tuple[int, int], list[np.ndarray]] = {}  # (fragment, shard): per worker
        self.average_errors: dict[tuple[int, int], np.ndarray] = {}  # re-encoding's, among 3 or more workers

    def _offset(self, fragment: int) -> int:
        return fragment * self.algo.sync_period // self.algo.fragments

    def _syncs(self, fragment: int, done: int) -> bool:
        algo = self.algo
        assert algo.local_start is not None
        since = done - algo.local_start - self._offset(fragment)
        return since >= 0 and since % algo.sync_period == 0 and done - algo.sync_delay > algo.local_start

    def _bounds(self, n: int, fragment: int) -> tuple[int, int]:
        base, extra = divmod(n, self.algo.fragments)
        start = fragment * base + min(fragment, extra)
        return start, start + base + (1 if fragment < extra else 0)

    def after_step(self, done: int, workers: list[torch.nn.Module], opts: list, lr: float) -> None:
        algo = self.algo
        flats = [torch.cat([p.detach().reshape(-1) for p in w.parameters()]) for w in workers]
        whole_period = algo.sync_delay == algo.sync_period
        after_the_run = algo.last_step is not None and done + algo.sync_delay > algo.last_step
        # The syncs whose Δ is taken now: each is applied τ steps later, or, with τ = H where that would be
        # after the run's last step, at once; below τ = H such a Δ is not taken.
        starting = [
            f
            for f in range(algo.fragments)
            if self._syncs(f, done + algo.sync_delay) and (whole_period or not after_the_run)
        ]
        # The syncs due now, whose Δ was taken (τ steps ago, or now where τ = 0).
        due = [
            f
            for f in range(algo.fragments)
            if self._syncs(f, done) and (f in self.pending or (algo.sync_delay == 0 and f in starting))
        ]
        # With τ = H a fragment's next Δ is taken at its own sync step, before that sync is applied: the
        # average applied now is set aside first.
        ready = {}
        if whole_period:
            ready = {f: (self.pending.pop(f), self.taken.pop(f)) for f in due}
        for fragment in starting:
            a, b = self._bounds(len(flats[0]), fragment)
            assert self.x_prev is not None
            workers_x = [flats[group[0]][a:b].clone() for group in _groups(len(flats), algo.ranks_per_worker)]
            deltas = [self.x_prev[a:b] - x for x in workers_x]
            self.taken[fragment] = workers_x
            self.pending[fragment] = self._average(fragment, deltas)
            if whole_period and fragment not in ready:
                # τ = H, the first Δ: taken H steps into the local phase, where no sync is due. Every
                # worker continues as after a sync whose average is zero, so that each later Δ holds
                # only the H steps since the one before.
                for w, x in zip(workers, flats, strict=True):
                    _write_flat(w, a, (1 - algo.sync_mix) * self.x_prev[a:b] + algo.sync_mix * x[a:b])
        for fragment in due:
            average, taken_x = (
                ready[fragment] if fragment in ready else (self.pending.pop(fragment), self.taken.pop(fragment))
            )
            self._apply(fragment, done, average, taken_x, workers, opts, lr)
        if whole_period and after_the_run:
            for fragment in starting:
                self._apply(
                    fragment,
                    done + algo.sync_delay,
                    self.pending.pop(fragment),
                    self.taken.pop(fragment),
                    workers,
                    opts,
                    lr,
                )

    def _apply(
        self,
        fragment: int,
        sync_step: int,
        average: torch.Tensor,
        taken_x: list[torch.Tensor],
        workers: list[torch.nn.Module],
        opts: list,
        lr: float,
    ) -> None:
        """x̄ = x_prev − avg Δ, the outer step on the k-th, 2k-th, ... sync, x_w ← (1 − α)·x_g + α·x_w."""
        algo = self.algo
        assert self.x_prev is not None and self.slow is not None and algo.local_start is not None
        a, b = self._bounds(len(self.x_prev), fragment)
        averaged = self.x_prev[a:b] - average
        taken = [x.double() for x in taken_x]
        if self.record is not None:
            mean = sum(taken) / len(taken)
            spread = sum(float(((x - mean) ** 2).sum()) for x in taken) / len(taken)
            self.record.append(
                {
                    "step": float(sync_step),
                    "consensus_distance": spread / float((mean**2).sum()),
                    "model_norm": float(mean.norm()),
                }
            )
        first = 1 if self._offset(fragment) > algo.sync_delay else 0
        number = (sync_step - algo.local_start - self._offset(fragment)) // algo.sync_period + first
        new = averaged
        if algo.outer != "none" and number % algo.outer_every == 0:
            delta = self.x_prev[a:b] - averaged
            if algo.outer == "slowmo":
                self.slow[a:b] = algo.slow_momentum * self.slow[a:b] + delta / lr
                new = self.x_prev[a:b] - algo.slow_lr * lr * self.slow[a:b]
            else:
                self.slow[a:b] = algo.outer_momentum * self.slow[a:b] + delta
                new = self.x_prev[a:b] - algo.outer_lr * (delta + algo.outer_momentum * self.slow[a:b])
            self.x_prev[a:b] = new
        elif algo.outer == "none":
            self.x_prev[a:b] = averaged
        for w in workers:
            x = torch.cat([p.detach().reshape(-1) for p in w.parameters()])
            _write_flat(w, a, (1 - algo.sync_mix) * new + algo.sync_mix * x[a:b])
        if fragment == 0:
            _average_bn_and_momentum(workers, opts, algo)

    def start(self, workers: list[torch.nn.Module]) -> None:
        self.x_prev = torch.cat([p.detach().reshape(-1) for p in workers[0].parameters()]).clone()
        self.slow = torch.zeros_like(self.x_prev)

    def _average(self, fragment: int, deltas: list[torch.Tensor]) -> torch.Tensor:
        algo = self.algo
        if algo.compression == "none":
            return sum(deltas) / len(deltas)
        n, shards = len(deltas[0]), algo.ranks_per_worker
        parts = []
        for shard in range(shards):
            base, extra = divmod(n, shards)
            a = shard * base + min(shard, extra)
            b = a + base + (1 if shard < extra else 0)
            key = (fragment, shard)
            errors = self.errors.get(key)
            if algo.error_feedback and errors is None:
                errors = [np.zeros(b - a, dtype=np.float32) for _ in deltas]
            average, errors, average_error = compressed_average(
                algo.compression,
                [d[a:b].numpy() for d in deltas],
                errors if algo.error_feedback else None,
                self.average_errors.get(key),
            )
            if errors is not None:
                self.errors[key] = errors
            if average_error is not None:
                self.average_errors[key] = average_error
            parts.append(torch.from_numpy(average))
        return torch.cat(parts)


def _write_flat(model: torch.nn.Module, start: int, values: torch.Tensor) -> None:
    """Write ``values`` into the model's parameters from flat position ``start`` on."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            lo, hi = max(start, offset), min(start + values.numel(), offset + p.numel())
            if lo < hi:
                p.view(-1)[lo - offset : hi - offset] = values[lo - start : hi - start]
            offset += p.numel()


def _average_bn_and_momentum(workers: list[torch.nn.Module], opts: list, algo: ReferenceAlgorithm) -> None:
    """At a global sync: BN statistics averaged (if so configured), momentum kept, averaged or reset."""
    with torch.no_grad():
        if algo.average_bn_buffers:
            for bufs in zip(*(w.buffers() for w in workers), strict=True):
                if bufs[0].is_floating_point():
                    mean = sum(bufs) / len(bufs)
                    for b in bufs:
                        b.copy_(mean)
        if algo.optimizer_state != "keep":
            states = [_state_tensors(w, opt) for w, opt in zip(workers, opts, strict=True)]
            for bufs in zip(*states, strict=True):
                new = sum(bufs) / len(bufs) if algo.optimizer_state == "average" else torch.zeros_like(bufs[0])
                for b in bufs:
                    b.copy_(new)


class TorchMuonAndAdamW:
    """A reference worker's optimizer for ``optim.name: muon``: PyTorch's own ``torch.optim.Muon`` on the
    hidden matrices (``hidden``, by name) and ``torch.optim.AdamW`` on the rest, side by side; Muon's LR is
    ``muon_lr_ratio`` times the one the reference sets (on AdamW's groups)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, lr: float, hidden: Sequence[str]) -> None:
        named = list(model.named_parameters())
        self.ratio = cfg.value("muon_lr_ratio")
        self.muon = torch.optim.Muon(
            [p for n, p in named if n in hidden],
            lr=0.0,
            weight_decay=cfg.weight_decay,
            momentum=cfg.value("muon_momentum"),
        )
        self.adamw = torch.optim.AdamW(
            [p for n, p in named if n not in hidden],
            lr=lr,
            betas=(cfg.value("beta1"), cfg.value("beta2")),
            eps=cfg.value("eps"),
            weight_decay=cfg.weight_decay,
        )
        self.param_groups = self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self) -> None:
        self.muon.zero_grad()
        self.adamw.zero_grad()

    def step(self) -> None:
        for group in self.muon.param_groups:
            group["lr"] = self.param_groups[0]["lr"] * self.ratio
        self.muon.step()
        self.adamw.step()


def reference_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, lr: float, hidden: Sequence[str] = ()
) -> torch.optim.Optimizer:
    """PyTorch's own optimizer for ``cfg.name``, as a reference worker steps it (lazily started)."""
    if cfg.name == "muon":
        return TorchMuonAndAdamW(model, cfg, lr, hidden)  # type: ignore[return-value]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=lr,
            betas=(cfg.value("beta1"), cfg.value("beta2")),
            eps=cfg.value("eps"),
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.value("momentum"), weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def _state_tensors(worker: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The per-parameter state tensors the package's registry names (SGD's and Muon's momentum buffers,
    AdamW's moments), of the parameters that keep them yet, whatever optimizer object keeps them."""
    keys = dict.fromkeys(key for entry in OPTIMIZER_STATES.values() for key in entry.tensors)
    return [opt.state[p][key] for key in keys for p in worker.parameters() if key in opt.state.get(p, {})]


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
            if algo.optimizer_state == "average":
                for i, r in enumerate(group):
                    tensors[i] += _state_tensors(workers[r], opts[r])
            for same in zip(*tensors, strict=True):
                mean = sum(same) / len(same)
                for t in same:
                    t.copy_(mean)

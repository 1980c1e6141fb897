"""Contiguous storage for everything that is averaged, so that a sync is one collective per dtype.

At start-up the parameters, the BatchNorm statistics and the inner optimizer's per-parameter state
(SGD's momentum buffers; ``optimizer_state.py`` says what each optimizer keeps) are moved into one flat
buffer per dtype and the originals are replaced by views into it (as
fairscale's FlatParameter and DDP's gradient-as-bucket-view do). Training then updates the
flat buffer in place, and averaging is an allreduce of one contiguous slice: no gather,
no scatter, no per-tensor collective.

Segments are laid out so that whatever a sync averages is one contiguous prefix of the
buffer: [averaged segments..., local segments...].

A process that simulates W workers (the ``simulated`` backend) holds every tensor stacked,
with a leading dimension of W; its flat buffer is then 2-D, ``[W, n]``, row w being worker w's
buffer laid out exactly as a real rank's. Offsets always index the last dimension
(``flat[..., start:end]``), so the averaging code is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .optimizer_state import STATE_KINDS, optimizer_state_of, start_scalar_state, stateful_parameters

PARAMS = "params"
BUFFERS = "buffers"  # floating-point module buffers (BatchNorm running statistics)
KINDS = (PARAMS, BUFFERS, *STATE_KINDS)  # STATE_KINDS: the inner optimizer's (SGD: MOMENTUM)


@dataclass
class FlatGroup:
    """All tensors of one dtype and device, stored back to back in ``flat``."""

    dtype: torch.dtype
    device: torch.device
    flat: torch.Tensor
    # (kind, start, end) for each segment in buffer order.
    segments: list[tuple[str, int, int]] = field(default_factory=list)

    def span(self, kinds: frozenset[str] | set[str]) -> list[tuple[int, int]]:
        """Maximal contiguous [start, end) ranges covering the segments of the given kinds."""
        ranges: list[tuple[int, int]] = []
        for kind, start, end in self.segments:
            if kind not in kinds or start == end:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def slice(self, kind: str) -> torch.Tensor:
        for k, start, end in self.segments:
            if k == kind:
                return self.flat[..., start:end]
        return self.flat[..., 0:0]


def contiguous_part(start: int, end: int, parts: int, index: int) -> tuple[int, int]:
    """Part ``index`` of ``parts`` contiguous parts of [start, end) (shards, fragments): the first
    (length % parts) parts one element longer."""
    base, extra = divmod(end - start, parts)
    first = start + index * base + min(index, extra)
    return first, first + base + (1 if index < extra else 0)


def column_view(flat: torch.Tensor, start: int, end: int, shape: torch.Size) -> torch.Tensor:
    """Elements [start, end) of every row of ``flat`` (1-D, or 2-D with one row per simulated
    worker) viewed as a tensor of ``shape`` (which includes the worker dimension when 2-D)."""
    return flat[..., start:end].view(shape)


def _module_float_buffers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    found = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                found.append((module, name, buffer))
    return found


def flatten_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, averaged_kinds: frozenset[str], replicas: int = 1
) -> list[FlatGroup]:
    """Move parameters, float buffers and the optimizer's per-parameter state into flat storage, one
    group per dtype.

    The optimizer's state tensors are created as zeros, which its first step treats as PyTorch's lazy
    start does (the registry refuses settings where it would not: SGD with dampening).
    Call after the model is on its device and before training; afterwards replace no
    parameter or buffer object (load state with ``copy_`` only). ``replicas`` > 1: every tensor is
    stacked over that many simulated workers (leading dimension) and the buffers are 2-D.
    """
    params = [p for p in model.parameters()]
    buffers = _module_float_buffers(model)
    state = optimizer_state_of(optimizer)
    members_of: dict[str, list[torch.Tensor]] = {PARAMS: list(params), BUFFERS: [b for _, _, b in buffers]}
    members_of.update({kind: stateful_parameters(optimizer, key) for key, kind in state.tensors.items()})

    order = [k for k in KINDS if k in averaged_kinds] + [k for k in KINDS if k not in averaged_kinds]
    by_key: dict[tuple[torch.dtype, torch.device], dict[str, list[torch.Tensor]]] = {}
    for kind, tensors in members_of.items():
        for t in tensors:
            if replicas > 1 and (t.dim() == 0 or t.shape[0] != replicas):
                raise ValueError(f"a tensor of shape {tuple(t.shape)} is not stacked over {replicas} workers")
            by_key.setdefault((t.dtype, t.device), {k: [] for k in KINDS})[kind].append(t)

    groups: list[FlatGroup] = []
    views: dict[tuple[str, int], torch.Tensor] = {}
    for (dtype, device), members in by_key.items():
        total = sum(t.numel() // replicas for kind in order for t in members[kind])
        flat = (
            torch.zeros(total, dtype=dtype, device=device)
            if replicas == 1
            else torch.zeros(replicas, total, dtype=dtype, device=device)
        )
        group = FlatGroup(dtype, device, flat)
        offset = 0
        for kind in order:
            start = offset
            for t in members[kind]:
                width = t.numel() // replicas
                view = column_view(flat, offset, offset + width, t.shape)
                if kind in (PARAMS, BUFFERS):
                    view.copy_(t.detach())
                views[(kind, id(t))] = view
                offset += width
            group.segments.append((kind, start, offset))
        groups.append(group)

    with torch.no_grad():
        for p in params:
            p.data = views[(PARAMS, id(p))]
    for module, name, buffer in buffers:
        module._buffers[name] = views[(BUFFERS, id(buffer))]
    for key, kind in state.tensors.items():
        for t in members_of[kind]:
            optimizer.state[t][key] = views[(kind, id(t))]
    start_scalar_state(optimizer)
    return groups

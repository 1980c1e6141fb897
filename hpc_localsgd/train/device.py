"""How a run sits on its device: channels-last activations, pinned host batches, DataLoader workers
and torch.compile, resolved from the ``train`` and ``data`` settings.

Channels-last applies to the activations only. The weights stay views into the engine's flat
buffer in their default (contiguous) layout: cuDNN and oneDNN run a convolution in channels-last
when its input is channels-last, converting the (small) weight on the fly, and a checkpoint's
flat segments then mean the same on every device, with the setting on or off.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable

import torch

from ..config.schema import RunConfig
from ..errors import RankLocalError, UserError

# Beyond this many workers per rank, decoding JPEGs no longer limits a GPU rank (torchvision's
# reference recipe uses 8-16 per GPU); more only costs memory.
MAX_AUTO_LOADER_WORKERS = 8


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, at start-up and in one line, a ``train.precision`` this device cannot run: bf16 on a GPU
    older than Ampere, or a dtype this torch's autocast does not support on the device (autocast would
    only warn and silently train in fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise RankLocalError(
            f"train.precision: bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer); "
            f"{device} is a {torch.cuda.get_device_name(device)}: use fp16"
        )
    reason = autocast_refusal(device.type, dtype)
    if reason is not None:
        raise RankLocalError(f"train.precision: {precision} cannot run on {device}: {reason}")


def autocast_refusal(device_type: str, dtype: torch.dtype) -> str | None:
    """Why torch.autocast would not run ``dtype`` on ``device_type`` (its warning), or None when it would."""
    if not torch.amp.is_autocast_available(device_type):
        return f"this torch has no autocast for {device_type}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=dtype):
            pass
    refusals = [str(w.message) for w in caught if "not supported" in str(w.message)]
    return " ".join(refusals[0].split()) if refusals else None


# Dense peak FLOP/s of the GPUs the package is run on, from the vendors' data sheets (without sparsity):
# bf16 and fp16 on the tensor cores; fp32 on the CUDA cores, which is what torch's default float32 matmul
# uses (TF32 is off unless a user turns it on). Matched by the first name that occurs in the device's name,
# so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM (HBM3)
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """The dense peak of ``device_name`` at ``precision`` (train.precision), or None when not in the table."""
    for name, peaks in PEAK_FLOPS:
        if name in device_name:
            return peaks.get(precision)
    return None


def has_2d_convolutions(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.Conv2d) for module in model.modules())


def use_channels_last(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """``train.channels_last``: as set, or (auto) on for 2-D convolutional models on CUDA."""
    setting = cfg.train.channels_last
    if setting == "auto":
        return device.type == "cuda" and has_2d_convolutions(model)
    return bool(setting)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of inputs on the training device: pinned host memory and a non-blocking copy to a GPU
    (the copy overlaps the work already queued), channels-last for 4-D images when asked."""
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def loader_workers(cfg: RunConfig, threads_per_rank: int) -> int:
    """``data.num_workers``: as set, or (auto) the rank's CPUs but one, at most 8. ``threads_per_rank``
    is the rank's share of the node's cores (launcher/env.py's threads_for_rank)."""
    setting = cfg.data.num_workers
    if setting == "auto":
        return max(0, min(MAX_AUTO_LOADER_WORKERS, threads_per_rank - 1))
    return setting


def compiled_forward(model: torch.nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """The model's forward through torch.compile. The engine's flat buffer composes with it: the
    parameters are the same objects for the whole run (only their values change, in place), so the
    compiled graph, which reads them as inputs, stays valid across syncs and checkpoint loads.

    What TorchInductor needs is checked here, so that a machine without it ends with one line at
    start-up rather than a compiler traceback at the first step."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("train.compile: TorchInductor needs Triton on CUDA, and this Python has none")
    elif shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("clang++") is None:
        raise UserError("train.compile: TorchInductor needs a C++ compiler on the CPU (g++, clang++ or $CXX)")
    return torch.compile(model)

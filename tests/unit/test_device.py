"""How a run sits on its device (train/device.py): channels-last, loader workers, precision checks,
torch.compile over the engine's flat buffer; and the torch backend's choice of process group."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms.flat import PARAMS, flatten_training_state
from hpc_localsgd.comm.torch_dist import process_group_backend
from hpc_localsgd.config.schema import RunConfig
from hpc_localsgd.errors import RankLocalError
from hpc_localsgd.train.device import (
    MAX_AUTO_LOADER_WORKERS,
    autocast_refusal,
    check_precision,
    compiled_forward,
    loader_workers,
    to_device,
    use_channels_last,
)
from hpc_localsgd.train.models import SmallCNN, mlp

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only compared, never allocated on


def config(**train: object) -> RunConfig:
    cfg = RunConfig()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_channels_last_auto_is_on_for_convolutions_on_cuda_only() -> None:
    cnn, dense = SmallCNN((1, 8, 8), 10, 4), mlp((1, 8, 8), 10, 4)
    assert use_channels_last(config(), cnn, CUDA)
    assert not use_channels_last(config(), dense, CUDA)
    assert not use_channels_last(config(), cnn, CPU)
    assert use_channels_last(config(channels_last=True), dense, CPU)
    assert not use_channels_last(config(channels_last=False), cnn, CUDA)


def test_channels_last_batches_keep_their_values() -> None:
    x = torch.randn(3, 2, 4, 5)
    moved = to_device(x, CPU, channels_last=True)
    assert moved.is_contiguous(memory_format=torch.channels_last) and not moved.is_contiguous()
    assert torch.equal(moved, x)
    labels = torch.arange(3)
    assert to_device(labels, CPU, channels_last=True) is labels  # only 4-D images change layout


def test_loader_workers_default_from_the_rank_cpus() -> None:
    cfg = RunConfig()
    assert cfg.data.num_workers == "auto"
    assert loader_workers(cfg, threads_per_rank=1) == 0  # one core: the training process needs it
    assert loader_workers(cfg, threads_per_rank=4) == 3
    assert loader_workers(cfg, threads_per_rank=64) == MAX_AUTO_LOADER_WORKERS
    fixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=5))
    assert loader_workers(fixed, threads_per_rank=64) == 5


def test_precision_checks() -> None:
    for precision in ("fp32", "bf16", "fp16"):
        check_precision(precision, CPU)  # every one runs on this torch's CPU autocast
    assert autocast_refusal("cpu", torch.bfloat16) is None
    # What a device without a dtype's autocast reports (autocast itself would only warn and train in fp32).
    reason = autocast_refusal("cpu", torch.float64)
    assert reason is not None and "not supported" in reason and "\n" not in reason


def test_bf16_on_a_gpu_without_bf16_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla V100-SXM2-32GB")
    with pytest.raises(RankLocalError) as error:
        check_precision("bf16", CUDA)
    assert str(error.value) == (
        "train.precision: bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer); "
        "cuda:0 is a Tesla V100-SXM2-32GB: use fp16"
    )


def test_torch_backend_uses_gloo_where_ranks_share_a_gpu() -> None:
    assert process_group_backend(CPU, ranks_on_node=4, visible_gpus=0, env={}) == "gloo"
    assert process_group_backend(CUDA, ranks_on_node=4, visible_gpus=4, env={}) == "nccl"
    # torchrun of two ranks on a one-GPU machine: NCCL refuses two ranks on one device.
    assert process_group_backend(CUDA, ranks_on_node=2, visible_gpus=1, env={}) == "gloo"
    # Slurm's --gpus-per-task: each rank sees its own GPU as its only one.
    assert process_group_backend(CUDA, ranks_on_node=4, visible_gpus=1, env={"CUDA_VISIBLE_DEVICES": "2"}) == "nccl"


def test_compiled_model_follows_the_flat_buffer_in_place() -> None:
    """The engine moves the weights into one flat buffer and changes them in place (optimizer steps,
    averages, checkpoint loads): the compiled forward must compute with the current values."""
    torch.manual_seed(0)
    model = mlp((1, 4, 4), 3, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (group,) = flatten_training_state(model, optimizer, frozenset({PARAMS}))
    compiled = compiled_forward(model, CPU)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            if step == 1:
                group.slice(PARAMS).mul_(0.5)  # what an average or a load does: new values, same storage
            # float32, one forward through compiled kernels: bit-identical under five CPU settings (docs/testing.md)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())

"""Models build for every input the datasets produce and give one row of logits per sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpc_localsgd.config.schema import ModelConfig
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.train.models import build_model

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
SMALL_IMAGENET = (3, 64, 64)


def _logits(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int = 7) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, input_shape)
    model.train()  # BatchNorm in training mode needs a batch of more than one sample
    return model(torch.randn(3, *input_shape))


@pytest.mark.parametrize("name", ["smallcnn", "mlp"])
@pytest.mark.parametrize("input_shape", [DIGITS, CIFAR, SMALL_IMAGENET, (3, 224, 224)])
def test_small_models(name: str, input_shape: tuple[int, ...]) -> None:
    assert _logits(ModelConfig(name=name, width=8), input_shape).shape == (3, 7)


def test_smallcnn_has_batchnorm_and_mlp_has_none() -> None:
    smallcnn = build_model(ModelConfig(name="smallcnn", width=4), 10, DIGITS)
    mlp = build_model(ModelConfig(name="mlp", width=4), 10, DIGITS)
    assert any(isinstance(m, nn.BatchNorm2d) for m in smallcnn.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mlp.modules())
    assert [p.shape for p in mlp.parameters()] == [(4, 64), (4,), (10, 4), (10,)]


def test_mlp_takes_flat_features_and_smallcnn_refuses_them() -> None:
    assert _logits(ModelConfig(name="mlp", width=5), (12,)).shape == (3, 7)
    with pytest.raises(ConfigError, match=r"^model\.name: 'smallcnn' needs images"):
        build_model(ModelConfig(name="smallcnn"), 7, (12,))


@pytest.mark.parametrize("input_shape", [DIGITS, CIFAR, SMALL_IMAGENET])
def test_resnet18_on_every_input(input_shape: tuple[int, ...]) -> None:
    assert _logits(ModelConfig(name="resnet18"), input_shape).shape == (3, 7)


def test_resnet_takes_the_data_channel_count() -> None:
    model = build_model(ModelConfig(name="resnet18"), 10, DIGITS)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)


def test_cifar_stem_keeps_full_resolution_into_the_residual_stages() -> None:
    for input_shape in (CIFAR, DIGITS):
        model = build_model(ModelConfig(name="resnet18", cifar_stem=True), 10, input_shape)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
        assert model.conv1.in_channels == input_shape[0]
        assert isinstance(model.maxpool, nn.Identity)
        x = torch.randn(2, *input_shape)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert stem.shape == (2, 64, *input_shape[1:])
        assert model(x).shape == (2, 10)


def test_resnet50_with_cifar_stem() -> None:
    model = build_model(ModelConfig(name="resnet50", cifar_stem=True), 100, CIFAR)
    assert model.fc.out_features == 100 and model.conv1.kernel_size == (3, 3)
    assert model.eval()(torch.randn(1, *CIFAR)).shape == (1, 100)


def test_other_torchvision_models() -> None:
    assert _logits(ModelConfig(name="mobilenet_v3_small"), CIFAR).shape == (3, 7)
    with pytest.raises(ConfigError, match=r"^model\.name: 'mobilenet_v3_small' takes 3-channel images"):
        build_model(ModelConfig(name="mobilenet_v3_small"), 10, DIGITS)
    with pytest.raises(ConfigError, match=r"^model\.cifar_stem: applies to the resnet family"):
        build_model(ModelConfig(name="mobilenet_v3_small", cifar_stem=True), 10, CIFAR)


def test_same_seed_same_weights() -> None:
    def weights() -> list[torch.Tensor]:
        torch.manual_seed(3)
        return list(build_model(ModelConfig(name="smallcnn"), 10, CIFAR).state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(weights(), weights(), strict=True))


def test_unknown_model() -> None:
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name="resnet19"), 10, CIFAR)
    assert str(info.value) == (
        "model.name: unknown model 'resnet19'; choose smallcnn, mlp, or a torchvision "
        "classification model such as resnet18 or resnet50"
    )

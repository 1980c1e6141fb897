"""Models by name: two small ones for tests and laptops, and any torchvision classifier.

Weights are random; the caller seeds torch first, so that every rank builds the same model
(and a broadcast from rank 0 only confirms it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import ModelConfig
from ..errors import ConfigError

# Largest side smallcnn convolves at: bigger inputs are average-pooled down to it first, so that
# a 224×224 ImageNet image costs about what a CIFAR image does.
SMALLCNN_MAX_SIDE = 32

# torchvision builders whose defaults return auxiliary outputs (a tuple) in training mode or warn
# about their initialisation; the training loop expects plain logits.
_TORCHVISION_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model named by ``cfg.name`` for inputs of ``input_shape`` (one sample) and ``num_classes``."""
    if cfg.name == "smallcnn":
        return SmallCNN(input_shape, num_classes, cfg.width)
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.width)
    return _torchvision_model(cfg, num_classes, input_shape)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: {name!r} needs images (channels, height, width), but the data gives "
            f"samples of shape {tuple(input_shape)}; use 'mlp'"
        )
    channels, height, width = input_shape
    return channels, height, width


class SmallCNN(nn.Module):
    """conv3×3(c→w)-BN-ReLU-[maxpool]-conv3×3(w→2w)-BN-ReLU-global average pool-Linear(2w→classes).

    BatchNorm is there on purpose: it gives the averaging engine running statistics to average.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int) -> None:
        super().__init__()
        channels, height, width_px = _image_shape("smallcnn", input_shape)
        shrink = max(1, min(height, width_px) // SMALLCNN_MAX_SIDE)
        side = min(height, width_px) // shrink
        layers: list[nn.Module] = [nn.AvgPool2d(shrink)] if shrink > 1 else []
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        # Pool once when there is room, so that the second layer sees a wider context.
        if side >= 16:
            layers.append(nn.MaxPool2d(2))
        layers += [
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Sequential:
    """Flatten-Linear-ReLU-Linear, no BatchNorm: its training maths is simple enough to check exactly."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def _is_resnet(model: nn.Module) -> bool:
    """ResNet, ResNeXt and wide ResNet share torchvision's ResNet class and its conv1/maxpool stem."""
    from torchvision.models import ResNet

    return isinstance(model, ResNet)


def _torchvision_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    import torchvision.models

    if cfg.name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"model.name: unknown model {cfg.name!r}; choose smallcnn, mlp, or a torchvision "
            "classification model such as resnet18 or resnet50"
        )
    channels, height, _ = _image_shape(cfg.name, input_shape)
    kwargs = dict(_TORCHVISION_KWARGS.get(cfg.name, {}))
    if cfg.name.startswith("vit_"):
        # Vision transformers size their position embeddings for one image size (224 by default).
        kwargs["image_size"] = height
    model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes, **kwargs)

    if not _is_resnet(model):
        if cfg.cifar_stem:
            raise ConfigError(
                f"model.cifar_stem: applies to the resnet family (resnet, resnext, wide_resnet), not {cfg.name!r}"
            )
        if channels != 3:
            raise ConfigError(
                f"model.name: {cfg.name!r} takes 3-channel images, but the data has {channels}; "
                "use smallcnn, mlp or a resnet"
            )
        return model

    stem: nn.Conv2d = model.conv1
    if cfg.cifar_stem:
        # He et al. 2016, §4.2: for 32×32 images the first layer is a 3×3 conv and nothing downsamples
        # before the residual stages.
        model.conv1 = nn.Conv2d(channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != stem.in_channels:
        # torch declares _ConvNd's kernel_size, stride and padding as tuple[int, ...] (shared by 1-3 dims);
        # a Conv2d's are pairs, which is what Conv2d takes.
        kernel, stride, padding = stem.kernel_size, stem.stride, stem.padding
        model.conv1 = nn.Conv2d(
            channels,
            stem.out_channels,
            kernel_size=kernel,  # type: ignore[arg-type]
            stride=stride,  # type: ignore[arg-type]
            padding=padding,  # type: ignore[arg-type]
            bias=False,
        )
    if model.conv1 is not stem:
        # The same initialisation torchvision gives its own stem.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model

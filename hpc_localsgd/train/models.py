"""Models by name: small ones for tests and laptops, a 1-D ResNet for sequences, any torchvision classifier,
and a decoder-only transformer for token sequences (gpt.py).

Weights are random; the caller seeds torch first, so that every rank builds the same model
(and a broadcast from rank 0 only confirms it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config.schema import ModelConfig
from ..errors import ConfigError
from .gpt import GPT

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
    """The model named by ``cfg.name`` for inputs of ``input_shape`` (one sample) and ``num_classes``.

    For ``gpt`` the classes are the data's token ids (largest id + 1) and a sample is a window of tokens.
    """
    if cfg.name == "gpt":
        return _gpt(cfg, num_classes, input_shape)
    if cfg.name == "smallcnn":
        return SmallCNN(input_shape, num_classes, cfg.width)
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.width)
    if cfg.name == "resnet1d":
        return ResNet1d(input_shape, num_classes, cfg.width)
    return _torchvision_model(cfg, num_classes, input_shape)


def hidden_matrix_names(model: nn.Module) -> list[str]:
    """The weight matrices Muon steps (``optim.name: muon``): every linear layer's but the last, which is
    the output head, and never one an embedding shares."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [f"{name}.weight" if name else "weight" for name, m in linears[:-1] if id(m.weight) not in embedded]


def _gpt(cfg: ModelConfig, vocabulary: int, input_shape: tuple[int, ...]) -> GPT:
    """The transformer of ``cfg.gpt``, refused where it could not embed every token or read the samples.

    The configuration's validation refuses non-language data for it earlier; this keeps the model honest
    when built directly (the bench, tests)."""
    gpt = cfg.gpt
    if len(input_shape) != 1:
        raise ConfigError(
            f"model.name: gpt learns token sequences (data.name tokens or text), not samples of shape {input_shape}"
        )
    if input_shape[0] > gpt.seq_len:
        raise ConfigError(
            f"model.gpt.seq_len: {gpt.seq_len} is shorter than the data's windows of {input_shape[0]} tokens"
        )
    if vocabulary > gpt.vocab:
        raise ConfigError(f"model.gpt.vocab: {gpt.vocab} is smaller than the data's {vocabulary} token ids; raise it")
    return GPT(gpt)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: {name!r} needs images (channels, height, width), but the data gives "
            f"samples of shape {tuple(input_shape)}; use 'mlp'"
            + (", 'smallcnn' or 'resnet1d'" if len(input_shape) == 2 else "")
        )
    channels, height, width = input_shape
    return channels, height, width


class SmallCNN(nn.Module):
    """conv3×3(c→w)-BN-ReLU-[maxpool]-conv3×3(w→2w)-BN-ReLU-global average pool-Linear(2w→classes).

    BatchNorm is there on purpose: it gives the averaging engine running statistics to average.
    Sequences (channels, length), such as MNIST-1D's, get the same network in 1-D (kernel 3).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int) -> None:
        super().__init__()
        one_d = len(input_shape) == 2  # sequences (channels, length): the same network in 1-D
        conv: Callable[..., nn.Module] = nn.Conv1d if one_d else nn.Conv2d
        norm: Callable[[int], nn.Module] = nn.BatchNorm1d if one_d else nn.BatchNorm2d
        pool: Callable[[int], nn.Module] = nn.MaxPool1d if one_d else nn.MaxPool2d
        global_pool: Callable[[int], nn.Module] = nn.AdaptiveAvgPool1d if one_d else nn.AdaptiveAvgPool2d
        layers: list[nn.Module] = []
        if one_d:
            channels, side = input_shape
        else:
            channels, height, width_px = _image_shape("smallcnn", input_shape)
            shrink = max(1, min(height, width_px) // SMALLCNN_MAX_SIDE)
            side = min(height, width_px) // shrink
            if shrink > 1:
                layers.append(nn.AvgPool2d(shrink))
        layers += [conv(channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU(inplace=True)]
        # Pool once when there is room, so that the second layer sees a wider context.
        if side >= 16:
            layers.append(pool(2))
        layers += [
            conv(width, 2 * width, 3, padding=1, bias=False),
            norm(2 * width),
            nn.ReLU(inplace=True),
            global_pool(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResidualBlock1d(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus the shortcut, then ReLU (He et al. 2016's basic block, in 1-D).

    The shortcut is a strided 1×1 conv + BN where the block changes width or length, else identity.
    """

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm1d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm1d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    """A small 1-D ResNet for sequences (channels, length), e.g. MNIST-1D's (1, 40).

    stem conv5(c→w)-BN-ReLU, three basic blocks of widths w, 2w, 4w (the last two halve the
    length), global average pool, Linear(4w→classes). BatchNorm in every block, as in the
    study's ResNet-50, so that running statistics drift between syncs and are averaged.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ConfigError(
                f"model.name: 'resnet1d' needs sequences (channels, length), but the data gives samples of "
                f"shape {tuple(input_shape)}; use it with data.name mnist1d"
            )
        channels = input_shape[0]
        self.layers = nn.Sequential(
            nn.Conv1d(channels, width, 5, padding=2, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            ResidualBlock1d(width, width, stride=1),
            ResidualBlock1d(width, 2 * width, stride=2),
            ResidualBlock1d(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

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

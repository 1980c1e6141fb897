"""The run's configuration: its typed schema, the loader that checks it, and the way a setting is declared."""

from .fields import describe, section, setting
from .load import build, config_to_dict, config_to_yaml, load_config, read_yaml
from .schema import (
    AlgorithmConfig,
    CheckpointConfig,
    CommConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "load_config",
    "config_to_dict",
    "config_to_yaml",
    "build",
    "read_yaml",
    "describe",
    "section",
    "setting",
    "RunConfig",
    "AlgorithmConfig",
    "CheckpointConfig",
    "CommConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "SyntheticConfig",
    "TrainConfig",
]

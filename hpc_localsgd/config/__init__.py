from .load import config_to_dict, config_to_yaml, load_config
from .schema import (AlgorithmConfig, CheckpointConfig, CommConfig, DataConfig, ModelConfig, OptimConfig,
                     OutputConfig, RunConfig, SyntheticConfig, TrainConfig)

__all__ = ["load_config", "config_to_dict", "config_to_yaml", "RunConfig", "AlgorithmConfig", "CheckpointConfig",
           "CommConfig", "DataConfig", "ModelConfig", "OptimConfig", "OutputConfig", "SyntheticConfig", "TrainConfig"]

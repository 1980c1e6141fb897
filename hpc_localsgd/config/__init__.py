from .load import config_to_dict, config_to_yaml, load_config
from .schema import (
                     AlgorithmConfig,
                     CommConfig,
                     DataConfig,
                     ModelConfig,
                     OptimConfig,
                     OutputConfig,
                     RunConfig,
                     SyntheticConfig,
                     TrainConfig,
)

__all__ = ["load_config", "config_to_dict", "config_to_yaml", "RunConfig", "AlgorithmConfig", "CommConfig",
           "DataConfig", "ModelConfig", "OptimConfig", "OutputConfig", "SyntheticConfig", "TrainConfig"]

"""Typed megamem config: `load_config(path, overrides)` is the one way in."""
from .load import (ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config, load_config,
                   parse_overrides, save_config)
from .aliases import mlp_type, position_type
from .schema import MLAConfig, PositionEncodingConfig, DataConfig, DatasetSpec, MegamemConfig, MemoryConfig, ModelConfig, ParallelConfig, TrainingConfig
from .validate import memory_problems, validate

__all__ = ["ConfigError", "DataConfig", "DatasetSpec", "MegamemConfig", "MemoryConfig", "ModelConfig", "ParallelConfig", "TrainingConfig", "apply_overrides",
           "config_from_dict", "config_to_dict", "dump_config", "load_config", "parse_overrides", "save_config", "memory_problems",
           "validate", "MLAConfig", "PositionEncodingConfig", "mlp_type", "position_type"]

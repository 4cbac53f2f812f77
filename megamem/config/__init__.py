"""Typed megamem config: `load_config(path, overrides)` is the one way in."""
from .aliases import mlp_type, position_type, rope_base
from .load import (ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config, load_config,
                   parse_overrides, save_config)
from .schema import (
    AttractorConfig,
    DataConfig,
    DatasetSpec,
    EvaluationConfig,
    MegamemConfig,
    MLAConfig,
    MemoryConfig,
    ModelConfig,
    ParallelConfig,
    PeerConfig,
    PositionEncodingConfig,
    TrainingConfig,
)
from .validate import validate
from .validate_memory import memory_problems

__all__ = [
    "AttractorConfig",
    "ConfigError",
    "DataConfig",
    "DatasetSpec",
    "EvaluationConfig",
    "MegamemConfig",
    "MLAConfig",
    "MemoryConfig",
    "ModelConfig",
    "ParallelConfig",
    "PeerConfig",
    "PositionEncodingConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "memory_problems",
    "mlp_type",
    "parse_overrides",
    "position_type",
    "rope_base",
    "save_config",
    "validate",
]

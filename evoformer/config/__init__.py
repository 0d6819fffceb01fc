"""Typed config schema, YAML/override loading and validation."""

from evoformer.config.loader import config_help, load_config, parse_override, to_yaml
from evoformer.config.schema import (
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    OptimConfig,
    PositionConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "AttentionConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "MLPConfig",
    "ModelConfig",
    "NormConfig",
    "OptimConfig",
    "PositionConfig",
    "RunConfig",
    "TrainConfig",
    "config_help",
    "load_config",
    "parse_override",
    "to_yaml",
]

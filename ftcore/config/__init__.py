"""The one typed config tree (schema.py: every field and cross-field rule) and how it is read (loading.py: YAML +
`--set`, one-line errors naming the field and line). Import from here: `from ftcore.config import Config,
load_config`."""

from ftcore.config.loading import (
    dump_config,
    field_docs,
    format_validation_error,
    load_config,
    parse_override,
    run_config_beside,
)
from ftcore.config.schema import (
                                  BUILTIN_PREFIX,
                                  MOVED_FIELDS,
                                  AdapterConfig,
                                  CheckpointConfig,
                                  Config,
                                  ConfigError,
                                  DataConfig,
                                  DataSource,
                                  DistributedConfig,
                                  EvaluationConfig,
                                  FieldError,
                                  FieldNames,
                                  LoggingConfig,
                                  LossConfig,
                                  ModelConfig,
                                  OptimizerConfig,
                                  PreferenceConfig,
                                  RewardConfig,
                                  RLConfig,
                                  Section,
                                  TrainConfig,
)

__all__ = ["BUILTIN_PREFIX", "MOVED_FIELDS", "AdapterConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DataSource",
           "DistributedConfig", "EvaluationConfig", "FieldError", "FieldNames", "LoggingConfig", "LossConfig",
           "ModelConfig", "OptimizerConfig", "PreferenceConfig", "RewardConfig", "RLConfig", "Section",
           "TrainConfig",
           "dump_config", "field_docs", "format_validation_error", "load_config", "parse_override",
           "run_config_beside"]

"""Typed run configuration: YAML + ``key.path=value`` overrides -> validated :class:`Config`.

Every section owns its schema and its checks, one module per section (``model``, ``data``, ``train``,
``parallel``, ``finetune``, ``distill``), gathered by the root :class:`Config` (``root``) and read by
:func:`load_config` (``load``, with the YAML reading in ``yaml_io``). Errors are raised as
:class:`ConfigError`, a one-line message naming the key and how to fix it; the CLI turns it into exit
code 2 before any process group starts or any file is written.

Keys that only steer *this* invocation (how long it runs, how often it logs) are listed in
:data:`RUN_CONTROL_KEYS`; everything else is part of the run's identity, hashed into every
checkpoint so that a resume with a changed model, data or optimizer is refused.
"""

from distrib.config.data import DATA_FILE_TYPES, DataConfig
from distrib.config.distill import COMPONENTS, DistillConfig, DistillLossConfig, StudentConfig
from distrib.config.fields import Float, Int, PathStr
from distrib.config.finetune import FinetuneConfig, FreezeConfig, LoraConfig
from distrib.config.load import load_config
from distrib.config.model import COMPILE_MIN_STEPS, ModelConfig
from distrib.config.parallel import DEEPSPEED_OWNED, ParallelConfig
from distrib.config.root import RUN_CONTROL_KEYS, Config, config_diff
from distrib.config.train import (
    CheckpointConfig,
    EvalConfig,
    ExportConfig,
    MetricsConfig,
    TrainConfig,
    file_size,
)
from distrib.config.yaml_io import parse_override
from distrib.errors import ConfigError

__all__ = [
    "COMPILE_MIN_STEPS",
    "COMPONENTS",
    "DEEPSPEED_OWNED",
    "RUN_CONTROL_KEYS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DATA_FILE_TYPES",
    "DataConfig",
    "DistillConfig",
    "DistillLossConfig",
    "EvalConfig",
    "ExportConfig",
    "FinetuneConfig",
    "Float",
    "FreezeConfig",
    "Int",
    "LoraConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParallelConfig",
    "PathStr",
    "StudentConfig",
    "TrainConfig",
    "config_diff",
    "file_size",
    "load_config",
    "parse_override",
]

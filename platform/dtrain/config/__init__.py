"""Typed config: every key a recipe may set, as a tree of dataclasses with types and docstrings
(`dtrain.config.schema`); a recipe file and its overrides (`recipe`); `dtrain keys` (`keys`);
secrets masked wherever they are shown or written (`redact`). Imports no torch."""

from dtrain.config.schema import CheckConfig as CheckConfig
from dtrain.config.schema import CheckpointConfig as CheckpointConfig
from dtrain.config.schema import Config as Config
from dtrain.config.schema import ConfigError as ConfigError
from dtrain.config.schema import DataConfig as DataConfig
from dtrain.config.schema import DeepSpeedConfig as DeepSpeedConfig
from dtrain.config.schema import FSDPConfig as FSDPConfig
from dtrain.config.schema import ModelConfig as ModelConfig
from dtrain.config.schema import OptimConfig as OptimConfig
from dtrain.config.schema import OptimizerName as OptimizerName
from dtrain.config.schema import TrackingConfig as TrackingConfig
from dtrain.config.schema import TrainConfig as TrainConfig
from dtrain.config.schema import optim_sections as optim_sections
from dtrain.config.schema import validate_optim as validate_optim

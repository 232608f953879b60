"""Typed config: every key a recipe may set, as a tree of dataclasses with types and docstrings, (`dtrain.config.schema`, re-exported)."""

from dtrain.config.schema import ConfigError as ConfigError
from dtrain.config.schema import OptimizerName as OptimizerName
from dtrain.config.schema import DataConfig as DataConfig
from dtrain.config.schema import TrainConfig as TrainConfig
from dtrain.config.schema import ModelConfig as ModelConfig
from dtrain.config.schema import OptimConfig as OptimConfig
from dtrain.config.schema import TrackingConfig as TrackingConfig
from dtrain.config.schema import CheckpointConfig as CheckpointConfig
from dtrain.config.schema import MonitorConfig as MonitorConfig
from dtrain.config.schema import CheckConfig as CheckConfig
from dtrain.config.schema import ProfileConfig as ProfileConfig
from dtrain.config.schema import TrialConfig as TrialConfig
from dtrain.config.schema import DeepSpeedConfig as DeepSpeedConfig
from dtrain.config.schema import EarlyStopConfig as EarlyStopConfig
from dtrain.config.schema import EMAConfig as EMAConfig
from dtrain.config.schema import DistillConfig as DistillConfig
from dtrain.config.schema import EWCConfig as EWCConfig
from dtrain.config.schema import PruneConfig as PruneConfig
from dtrain.config.schema import FSDPConfig as FSDPConfig
from dtrain.config.schema import Config as Config
from dtrain.config.schema import optim_sections as optim_sections
from dtrain.config.schema import validate_optim as validate_optim
from dtrain.config.schema import _check as _check
from dtrain.config.schema import _positive as _positive
from dtrain.config.schema import _non_negative as _non_negative

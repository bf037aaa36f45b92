"""Typed configuration: schema (dataclasses), load (YAML merge and overrides), derive (validation and
derived values), deepspeed_config (the engine's dict)."""

from mixmae_scale.config.derive import Derived, ResolvedConfig, load_resolved, resolve, run_kind
from mixmae_scale.config.load import ConfigError, load_config
from mixmae_scale.config.schema import Config

__all__ = ["Config", "ConfigError", "Derived", "ResolvedConfig", "load_config", "load_resolved", "resolve", "run_kind"]

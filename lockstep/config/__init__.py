"""Typed, sectioned configuration: TOML presets plus ``--section.key value`` overrides."""

from lockstep.config.errors import ConfigError
from lockstep.config.job import JobConfig, validate_job_config
from lockstep.config.loader import dump_toml, load_config

__all__ = ["ConfigError", "JobConfig", "dump_toml", "load_config", "validate_job_config"]

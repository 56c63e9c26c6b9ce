"""The typed sftkit config: schema, loader (NeMo RL YAML, `defaults:`, overrides), errors."""

from sftkit.config.checks import check_config, ignored_settings
from sftkit.config.errors import ConfigError
from sftkit.config.load import (
    DEFAULT_CONFIG_PATH,
    config_to_dict,
    config_to_yaml,
    load_config,
    load_config_dict,
    redact_secrets,
    register_resolvers,
)
from sftkit.config.schema import IGNORED_KEYS, MasterConfig

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "IGNORED_KEYS",
    "ConfigError",
    "MasterConfig",
    "check_config",
    "config_to_dict",
    "config_to_yaml",
    "ignored_settings",
    "load_config",
    "load_config_dict",
    "redact_secrets",
    "register_resolvers",
]

"""Config system (typed dataclasses from YAML) and the YAML presets that live beside it."""

from configs.loader import (
    ConfigError,
    add_config_arguments,
    from_dict,
    load_config,
    resolve_config_path,
    save_config,
    to_dict,
    to_yaml,
)
from configs.schema import Config

__all__ = [
    "Config", "ConfigError", "add_config_arguments", "from_dict", "load_config", "resolve_config_path",
    "save_config", "to_dict", "to_yaml",
]

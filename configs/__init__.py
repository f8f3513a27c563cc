"""Config system (typed dataclasses from YAML) and the YAML presets that live beside it: the top floor, which
gathers every package's torch-free config section (configs/schema.py). Errors live at the bottom, in common/.

Names are imported on first use (PEP 562), so that importing `configs.loader` alone pulls in no schema.
"""

import importlib

_EXPORTS = {
    "Config": "configs.schema",
    "ConfigError": "configs.loader",
    "add_config_arguments": "configs.loader",
    "from_dict": "configs.loader",
    "load_config": "configs.loader",
    "resolve_config_path": "configs.loader",
    "save_config": "configs.loader",
    "to_dict": "configs.loader",
    "to_yaml": "configs.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'configs' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Typed configs: dataclasses filled from YAML, with `base:` inheritance and `--set a.b=value` overrides.

Every key is checked against the dataclass: an unknown key or a value of the wrong type is a ConfigError
that names the key, what was expected and the nearest valid key.
"""

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from common.choices import choice_message
from common.errors import UserError
from common.files import atomic_path

PRESET_DIR = Path(__file__).resolve().parent


class ConfigError(UserError):
    """A config file, key or value that is wrong; the message names it and what would be right."""


# ----------------------------------------------------------------------------------------------------------
# YAML files with inheritance


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a preset name from configs/ (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for cand in (PRESET_DIR / path, PRESET_DIR / f"{path}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(path.stem, presets, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; presets: {', '.join(presets)}"
    raise ConfigError(f"config file {name} not found{hint}")


def read_yaml_with_bases(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """Load a YAML mapping; `base: other.yaml` (or a list) is loaded first and this file merged over it."""
    path = resolve_config_path(path).resolve()
    if path in _chain:
        raise ConfigError(f"config inheritance loops: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        merged = deep_merge(merged, read_yaml_with_bases(base_path, (*_chain, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of `over` win, nested mappings merge."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass with checking


def _nearest(key: str, valid, prefix: str = "") -> str:
    """'; did you mean 'model.depth'?' for the closest valid key, else the list of valid keys."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys here: {', '.join(valid)}"


def _check_value(value, tp, where: str):
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(choice_message(where, value, args))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        item = args[0] if args else typing.Any
        items = [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _check_value(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if hasattr(cls, "config_defaults"):  # e.g. a model variant's fields are its section's defaults
        data = deep_merge(cls.config_defaults(data), data)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_nearest(key, names, f'{where}.' if where else '')}")
        kwargs[key] = _check_value(value, hints[key], path)
    try:
        cfg = cls(**kwargs)
        if hasattr(cfg, "validate"):  # one check per section of values that are well typed but wrong together
            cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return cfg


def to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(cfg))
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Overrides and command lines


def parse_override(assignment: str) -> tuple[list[str], object]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML: 4 -> int, true -> bool, [1, 2] -> list)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, for example --set model.depth=12")
    key, raw = assignment.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(cls, data: dict, assignment: str) -> dict:
    """Set one dotted key in the raw dict after checking the path exists in dataclass `cls`."""
    keys, value = parse_override(assignment)
    node_cls, node, done = cls, data, []
    for i, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if key not in names:
            where, prefix = ".".join([*done, key]), "".join(f"{d}." for d in done)
            raise ConfigError(f"--set {assignment}: unknown config key {where!r}{_nearest(key, names, prefix)}")
        done.append(key)
        if i == len(keys) - 1:
            node[key] = value
            break
        sub = typing.get_type_hints(node_cls)[key]
        if typing.get_origin(sub) is dict:  # one entry of a mapping, e.g. sample.sampler_options.timesteps=[...]
            if i != len(keys) - 2:
                raise ConfigError(f"--set {assignment}: {'.'.join(done)} is a mapping of values; set one entry with "
                                  f"{'.'.join(done)}.KEY=VALUE")
            if node.get(key) is not None and not isinstance(node[key], dict):
                raise ConfigError(f"--set {assignment}: {'.'.join(done)} is {node[key]!r}, not a mapping")
            node[key] = {**(node.get(key) or {}), keys[-1]: value}
            break
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"--set {assignment}: {'.'.join(done)} is a value, not a section")
        node = node.setdefault(key, {})
        node_cls = sub
    return data


def load_config(cls, path: str | os.PathLike | None = None, overrides=()):
    """Config dataclass `cls` from a YAML file (or the defaults) plus `--set` overrides, fully checked."""
    data = read_yaml_with_bases(path) if path else {}
    for assignment in overrides:
        data = apply_override(cls, data, assignment)
    return from_dict(cls, data)


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None):
    """--config, --set (repeatable) and --print-config."""
    parser.add_argument("--config", default=default, help="YAML config file or preset name in configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set model.depth=12 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

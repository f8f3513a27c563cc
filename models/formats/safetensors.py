"""This project's own weights file: safetensors with official key names and the PixArtConfig (JSON) in the metadata,
beside the run config, step and quantisation of whatever wrote it."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import CheckpointError
from common.files import atomic_path
from common.safetensors_file import save_file
from models.variants import PixArtConfig

FORMAT_TAG = "pixart-delta"  # metadata["format"] of this project's safetensors files


def safetensors_header(path: Path) -> tuple[list[str], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file, it may be corrupt or truncated "
                              f"({e}); re-download or re-convert it") from e


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def config_from_json(text: str, path: Path) -> PixArtConfig:
    data = json.loads(text)
    valid = {f.name for f in fields(PixArtConfig)}
    unknown = set(data) - valid
    if unknown:
        raise CheckpointError(f"{path} stores model config keys this version does not know: {sorted(unknown)}")
    return PixArtConfig(**data)


def write_safetensors(sd: dict[str, torch.Tensor], cfg: PixArtConfig, path: Path, metadata: dict[str, str] | None,
                      int8: bool) -> None:
    """The weights with the config (and `quantization: int8` for int8 weights, unless `metadata` names the int8
    mode) in the metadata, atomically."""
    meta = {"format": FORMAT_TAG, "model_config": json.dumps(asdict(cfg)), **(metadata or {})}
    if int8:
        meta.setdefault("quantization", "int8")
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)

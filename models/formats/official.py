"""The PixArt-alpha / -Sigma repositories' own format: a torch .pth (weights under "state_dict", or bare), official
key names (this project's module names), an optional pos_embed buffer. It carries no config: this project writes
one beside it (NAME.yaml, a `model:` section) and reads it back.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from common.errors import CheckpointError
from common.files import TRAIN_STATE_FORMAT, atomic_path, training_state_message
from models.embeddings import sincos_pos_embed_2d
from models.formats.safetensors import config_from_json
from models.variants import PixArtConfig


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with mmap (weights stay in the page cache, not copied) and weights_only."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: the file may be corrupt or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"re-download or re-convert it") from e
    if isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT:
        raise CheckpointError(training_state_message(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensor state dict (top-level keys: {list(obj)[:8]})")
    return obj


def read_sidecar_config(path: Path) -> PixArtConfig | None:
    """The `model:` section of NAME.yaml beside an official NAME.pth (written by save_checkpoint), if any."""
    side = path.with_suffix(".yaml")
    if not side.is_file():
        return None
    data = yaml.safe_load(side.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    return config_from_json(json.dumps(data["model"]), side)


def write_official(sd: dict[str, torch.Tensor], cfg: PixArtConfig, path: Path) -> None:
    """path (.pth, with the pos_embed buffer official code expects at the config's base grid) and path.yaml."""
    grid = cfg.latent_size // cfg.patch_size
    pos = sincos_pos_embed_2d(cfg.hidden_size, grid, grid, grid, cfg.pe_interpolation)[None]
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {**sd, "pos_embed": pos}}, tmp)
    with atomic_path(path.with_suffix(".yaml")) as tmp:  # the config official files lack; also a --config
        tmp.write_text(yaml.safe_dump({"model": asdict(cfg)}, sort_keys=False))

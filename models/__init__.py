"""Networks: the PixArt-alpha transformer, its building blocks, and checkpoint formats.

    from models import build_pixart, load_checkpoint
    model = build_pixart(cfg.model)                        # random init from a config
    model, model_cfg, report = load_checkpoint(path)       # any supported checkpoint, format detected
"""

from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from models.pixart import PIXART_ARCHS, PixArt, PixArtConfig, build_pixart

__all__ = [
    "PIXART_ARCHS", "CheckpointError", "PixArt", "PixArtConfig", "build_pixart", "load_checkpoint",
    "read_checkpoint", "save_checkpoint",
]

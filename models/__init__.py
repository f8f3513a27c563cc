"""Networks: the PixArt transformer, its building blocks, its variants and checkpoint formats.

    from models import build_pixart, load_checkpoint
    model = build_pixart(cfg.model)                        # random init from a config
    model, model_cfg, report = load_checkpoint(path)       # any supported checkpoint, format detected

Names are imported on first use (PEP 562), so that `models.variants` (read by every config) imports no torch.
"""

import importlib

from common.notices import quiet_library_notices

quiet_library_notices()  # transformers / diffusers import torchao, which prints notices meant for its developers

_EXPORTS = {
    "CheckpointError": "common.errors",
    "load_checkpoint": "models.checkpoint",
    "read_checkpoint": "models.checkpoint",
    "save_checkpoint": "models.checkpoint",
    "PixArt": "models.pixart",
    "build_pixart": "models.pixart",
    "PIXART_ARCHS": "models.variants",
    "PixArtConfig": "models.variants",
    "VARIANTS": "models.variants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

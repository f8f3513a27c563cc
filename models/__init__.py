"""Networks: the PixArt transformer, its building blocks, its variants and checkpoint formats.

    from models import build_pixart, load_checkpoint
    model = build_pixart(cfg.model)                        # random init from a config
    model, model_cfg, report = load_checkpoint(path)       # any supported checkpoint, format detected

Names are imported on first use (PEP 562), so that `models.variants` (read by every config) imports no torch.
"""

import importlib
import logging

# Import-time notices of library pairings, not about the user's run: torchao registers enums with torch's pytree
# (a deprecation notice for torchao), and diffusers 0.42 looks for torchao classes that torchao 0.18 renamed (it
# uses them only to read torchao-pickled diffusers checkpoints, which this project does not). diffusers imports
# torchao whenever torchao is installed.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

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

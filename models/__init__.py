"""Networks: the PixArt-alpha transformer, its building blocks, and checkpoint formats.

    from models import build_pixart, load_checkpoint
    model = build_pixart(cfg.model)                        # random init from a config
    model, model_cfg, report = load_checkpoint(path)       # any supported checkpoint, format detected
"""

import logging

# Import-time notices of library pairings, not about the user's run: torchao registers enums with torch's pytree
# (a deprecation notice for torchao), and diffusers 0.42 looks for torchao classes that torchao 0.18 renamed (it
# uses them only to read torchao-pickled diffusers checkpoints, which this project does not). diffusers imports
# torchao whenever torchao is installed.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from models.pixart import PIXART_ARCHS, PixArt, PixArtConfig, build_pixart  # noqa: E402

__all__ = [
    "PIXART_ARCHS", "CheckpointError", "PixArt", "PixArtConfig", "build_pixart", "load_checkpoint",
    "read_checkpoint", "save_checkpoint",
]

"""Quiet the import-time notices that third-party libraries print about each other, not about the user's run.

torchao registers its enums with torch's pytree, which torch 2.14 answers with a deprecation warning addressed to
torchao's developers; diffusers 0.42 looks for torchao classes that torchao 0.18 renamed (it needs them only to read
torchao-pickled diffusers checkpoints, which this project never does). transformers and diffusers import torchao
whenever it is installed, so any entry point that imports either calls `quiet_library_notices()` first.
"""

import logging

_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_library_notices() -> None:
    """Raise the level of the loggers above to ERROR (idempotent; real errors still print)."""
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

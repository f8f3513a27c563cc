"""Storage precision of the frozen networks a training task holds (teacher, ControlNet base, LoRA's base weights).

A frozen network takes no gradient and no optimiser state, and under autocast its matmuls run in the autocast dtype
whatever it is stored in: storing it in bf16 halves its memory (1.2 GB of XL-2's 2.4 GB) at the price of rounding
the few operations autocast leaves in fp32 (its normalisation-free adaLN tables, biases of non-autocast ops).
"""

import torch
from torch import nn

from common.errors import UserError

FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype(name: str) -> torch.dtype:
    """The torch dtype of train.frozen_dtype, or a UserError naming the valid values."""
    if name not in FROZEN_DTYPES:
        raise UserError(f"train.frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {name!r}")
    return FROZEN_DTYPES[name]


def store_frozen(module: nn.Module, name: str) -> nn.Module:
    """Cast the frozen floating-point parameters of `module` to train.frozen_dtype `name`, in place; trainable
    parameters keep their dtype (fp32 master weights for AdamW) and buffers are left as they are."""
    dtype = frozen_dtype(name)
    with torch.no_grad():
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    return module

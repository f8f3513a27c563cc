"""Exponential moving average of a model's trainable parameters.

Frozen parameters (a teacher, a ControlNet's base model, the base weights under LoRA adapters) are never copied:
the EMA holds one shadow tensor per trainable parameter, and `applied(model)` swaps them in for sampling or
export. Under FSDP the parameters are sharded DTensors and so are their shadows: the update stays local.
"""

import contextlib

import torch
from torch import nn

from common.errors import UserError


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


class EMA:
    """shadow = d * shadow + (1 - d) * parameter after every optimiser step, for the trainable parameters.

    With warmup, d = min(decay, (1 + n) / (10 + n)) after n updates, so that a model trained from scratch is not
    averaged with its random initial weights for the first ~1 / (1 - decay) steps; without, d = decay throughout
    (the consistency-distillation target, mu = 0.95).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise UserError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        params = dict(model.named_parameters())
        self.shadow = {name: params[name].detach().clone() for name in trainable_names(model)}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model's trainable parameters hold the EMA values; restored afterwards."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, shadow in self.shadow.items():
                    params[name].copy_(shadow)
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        """{"shadow": {name: tensor}, "updates": n}; shadows of FSDP-sharded parameters are gathered (collective)."""
        full = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in self.shadow.items()}
        return {"shadow": {name: t.detach().cpu() for name, t in full.items()}, "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"the EMA in the checkpoint tracks other parameters: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for name, target in self.shadow.items():
            target.copy_(_like(shadow[name], target))
        self.updates = int(state["updates"])


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `target`: sharded the same way when target is a DTensor."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh, target.placements)
    return full.to(target.device, target.dtype)

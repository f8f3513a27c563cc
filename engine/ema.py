"""Exponential moving average of a model's weights (the weights that are exported and sampled from)."""

import copy

import torch
from torch import nn


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights, after every optimiser step, for floating-point tensors."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow = self.model.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                shadow[name].lerp_(value.to(shadow[name].dtype), 1.0 - self.decay)
            else:
                shadow[name].copy_(value)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

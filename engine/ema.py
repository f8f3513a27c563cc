"""Exponential moving average of a model's weights (the weights that are exported and sampled from)."""

import copy

import torch
from torch import nn


class EMA:
    """shadow = d * shadow + (1 - d) * weights after every optimiser step, for floating-point tensors.

    d = min(decay, (1 + n) / (10 + n)) after n updates: a warm-up, so that a model trained from scratch is not
    averaged with its random initial weights for the first ~1 / (1 - decay) steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        shadow = self.model.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                shadow[name].lerp_(value.to(shadow[name].dtype), 1.0 - decay)
            else:
                shadow[name].copy_(value)


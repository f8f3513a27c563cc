"""A network seen through its parameterisation: what its first C output channels predict (eps, v or x0), with the
learned-variance channels split off once. Samplers, losses and distillation ask it for the quantity they need
instead of converting prediction types themselves.

    d = Denoiser(net, schedule, "v")            # net(x, t, **cond) -> (N, C or 2C, H, W)
    eps = d.eps(x, t, **cond)                   # (N, C, H, W) noise estimate, whatever the network predicts
    x0 = d.x0(x, t, **cond)                     # clean-sample estimate
    out = d(x, t, **cond)                       # Output(pred, variance): the raw prediction and the extra channels
    d.convert(out.pred, x, t, "eps")            # the same conversion on an output already computed

Conversions (Salimans & Ho 2022; alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)):
x_t = alpha_t x0 + sigma_t eps, v = alpha_t eps - sigma_t x0, so x0 = alpha_t x_t - sigma_t v and
eps = sigma_t x_t + alpha_t v.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from common.errors import UserError
from diffusion.config import PREDICTIONS
from diffusion.schedule import NoiseSchedule

Network = Callable[..., Tensor]  # net(x (N, C, H, W), t (N,), **conditions) -> (N, C or 2C, H, W)


class Output(NamedTuple):
    """A network's output split by meaning."""

    pred: Tensor             # (N, C, H, W) what the network predicts: eps, v or x0 (its prediction type)
    variance: Tensor | None  # (N, C, H, W) learned-variance interpolation channels (learn sigma), or None


class Denoiser:
    """net with its prediction type and noise schedule; dtype: compute the conversions in this dtype (None: the
    network's output dtype; distillation and losses use float32)."""

    def __init__(self, net: Network, schedule: NoiseSchedule, prediction: str = "eps",
                 dtype: torch.dtype | None = None):
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.net, self.schedule, self.prediction, self.dtype = net, schedule, prediction, dtype

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Output:
        out = self.net(x, t, **cond)  # (N, C or 2C, H, W)
        c = x.shape[1]
        pred, variance = out[:, :c], (out[:, c:] if out.shape[1] > c else None)
        return Output(pred if self.dtype is None else pred.to(self.dtype), variance)

    def convert(self, pred: Tensor, x: Tensor, t: Tensor, to: str) -> Tensor:
        """A prediction of this network's type at (x, t) as `to` (eps, v or x0)."""
        if to == self.prediction:
            return pred
        x = x if self.dtype is None else x.to(self.dtype)
        if to == "eps":
            return self.schedule.to_eps(self.prediction, pred, x, t)
        x0 = self.schedule.to_x0(self.prediction, pred, x, t)
        if to == "x0":
            return x0
        if to == "v":
            eps = self.schedule.to_eps(self.prediction, pred, x, t)
            alpha, sigma = self.schedule.alpha_sigma(t, x)
            return alpha * eps - sigma * x0  # v = alpha_t eps - sigma_t x0
        raise UserError(f"unknown prediction type {to!r}; valid: {', '.join(PREDICTIONS)}")

    def eps(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """Noise estimate (N, C, H, W): the samplers' currency."""
        return self.convert(self(x, t, **cond).pred, x, t, "eps")

    def x0(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """Clean-sample estimate (N, C, H, W)."""
        return self.convert(self(x, t, **cond).pred, x, t, "x0")

    def v(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """v estimate (N, C, H, W)."""
        return self.convert(self(x, t, **cond).pred, x, t, "v")

"""Two small layers the transformer is built from, with the parameter names of the official checkpoints (which
took them from timm): PatchEmbed (`proj`) and Mlp (`fc1`, `fc2`). Written here so that building or loading a
model does not import timm (over a second of start-up: it imports torchvision and torch._dynamo)."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> tokens (N, H/p * W/p, D), row-major: one p x p patch per token (a strided conv)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, h*w, D)


class Mlp(nn.Module):
    """fc2(GELU_tanh(fc1(x))): the transformer blocks' MLP and the caption projection."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def building_on_meta() -> bool:
    """Whether modules are being built on the meta device (shells that receive a checkpoint's weights)."""
    return torch.empty(0).device.type == "meta"


def scaled_randn(*shape: int, scale: float) -> torch.Tensor:
    """randn(*shape) / scale, drawn from the global generator; uninitialised on the meta device, where randn would
    import sympy and torch._dynamo (a second of start-up) for values that are never used."""
    if building_on_meta():
        return torch.empty(*shape)
    return torch.randn(*shape).div_(scale)

"""Input embeddings of the PixArt-alpha transformer: positions, timesteps, sizes and captions."""

import math

import torch
from torch import nn

from common.errors import UserError
from models.layers import Mlp, scaled_randn


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of positions `pos` (M,) -> (M, dim): [sin(pos w), cos(pos w)], w_i = 10000^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = torch.outer(pos.to(torch.float64), omega)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)  # (M, dim)


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int, base_size: int, interpolation: float, device=None
) -> torch.Tensor:
    """Fixed 2-D positional embedding for a grid_h x grid_w token grid -> (grid_h * grid_w, dim) in float32.

    Coordinates are divided by (grid / base_size) and by the interpolation scale, so every grid spans the
    coordinate range of the base grid the model was trained on: that is what lets one model run at other
    resolutions and aspect ratios. Tokens are row-major (h, w); the first half of the channels encodes the
    column (w) coordinate, the second half the row (h) coordinate, as in the official and diffusers code.
    """
    if dim % 4 != 0:
        raise UserError(f"the positional embedding needs hidden_size divisible by 4, got {dim}")
    ys = torch.arange(grid_h, dtype=torch.float32, device=device) / (grid_h / base_size) / interpolation
    xs = torch.arange(grid_w, dtype=torch.float32, device=device) / (grid_w / base_size) / interpolation
    row, col = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(dim // 2, col.reshape(-1)), sincos_1d(dim // 2, row.reshape(-1))], dim=1)
    return emb.float()  # (h*w, dim)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of scalar conditions t (N,) -> (N, dim) as [cos, sin] (DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Scalar -> 256 sin-cos features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype)  # (N, 256)
        return self.mlp(feats)  # (N, D)


class GuidanceEmbedder(nn.Module):
    """LCM's guidance-scale condition: sin-cos features of 1000 w -> a linear map (no bias) initialised to zero,
    added to the timestep embedding, so a student made from its teacher starts as exactly the teacher."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.proj = nn.Linear(frequency_dim, hidden_size, bias=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(w.float() * 1000.0, self.frequency_dim).to(self.proj.weight.dtype)  # (N, 256)
        return self.proj(feats)  # (N, D)


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of k scalar micro-conditions separately and concatenates: (N, k) -> (N, k * D)."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        n = values.shape[0]
        emb = super().forward(values.reshape(-1))  # (N*k, D)
        return emb.reshape(n, -1)  # (N, k*D)


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the hidden size; holds the learned null caption used for dropout and CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, caption_tokens: int):
        super().__init__()
        self.y_proj = Mlp(in_features=caption_channels, hidden_features=hidden_size, out_features=hidden_size)
        # A fixed random "null caption" (a buffer, as in the official code: it is never trained).
        self.register_buffer("y_embedding", scaled_randn(caption_tokens, caption_channels, scale=caption_channels**0.5))

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """y (N, L, C) T5 features; drop (N,) bool: rows replaced by the null caption before projection."""
        if drop is not None:
            if y.shape[1] != self.y_embedding.shape[0]:
                raise ValueError(
                    f"dropping captions to the null caption needs {self.y_embedding.shape[0]} caption tokens "
                    f"(the null caption's length), got {y.shape[1]}; pad or cut the T5 features to that length"
                )
            y = torch.where(drop[:, None, None], self.y_embedding.to(y.dtype)[None], y)  # (N, L, C)
        return self.y_proj(y)  # (N, L, D)

"""Multi-head self- and cross-attention on torch's scaled_dot_product_attention, and PixArt-Sigma's KV compression."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from common.errors import UserError


class KVCompressionError(UserError):
    """KV compression asked of a token grid its stride does not divide; the message names both."""


class SelfAttention(nn.Module):
    """Self-attention over image tokens with one fused qkv projection.

    With kv_stride s > 1 (PixArt-Sigma's KV compression) the keys and values, not the queries, come from the token
    grid downsampled by an s x s, stride-s convolution per channel (`sr`, groups = D; one layer for both), initialised
    as the average of each cell, followed (as in the official code) by a LayerNorm (`norm`): T / s^2 keys per query.
    Module names are the official checkpoints' (`attn.sr`, `attn.norm`).
    """

    def __init__(self, dim: int, num_heads: int, kv_stride: int = 1, kv_norm: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise UserError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kv_stride = kv_stride
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if kv_stride > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_stride, stride=kv_stride, groups=dim)
            self.norm = nn.LayerNorm(dim) if kv_norm else nn.Identity()
            self.reset_compression()

    def reset_compression(self) -> None:
        """The average over each cell (weights 1/s^2, bias 0): a fresh layer attends to the cells' mean tokens."""
        nn.init.constant_(self.sr.weight, 1.0 / self.kv_stride**2)
        nn.init.zeros_(self.sr.bias)

    def compress(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens (N, h*w, D) of a row-major h x w grid -> (N, h/s * w/s, D)."""
        (h, w), s = grid, self.kv_stride
        if h * w != x.shape[1]:
            raise ValueError(f"the token grid {h}x{w} does not hold the {x.shape[1]} tokens: build the Conditioning "
                             f"with the image's grid (PixArt.condition(..., grid=(h, w)))")
        if h % s or w % s:
            raise KVCompressionError(
                f"KV compression with stride {s} needs a token grid whose sides divide by {s}, got {h}x{w} tokens "
                f"(latent {h}x{w} times the patch size): use an image whose sides are multiples of {16 * s} px "
                f"(8x VAE, patch 2), or turn compression off with --set model.kv_compress_blocks=[]")
        cells = self.sr(rearrange(x, "N (h w) D -> N D h w", h=h, w=w))  # (N, D, h/s, w/s)
        return self.norm(rearrange(cells, "N D h w -> N (h w) D"))  # (N, h*w/s^2, D)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (N, T, D) tokens of a row-major grid = (h, w), h * w = T."""
        if self.kv_stride == 1:
            qkv = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)  # 3 x (N, H, T, Dh)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, Dh)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, D) each
            k, v = self.compress(k, grid), self.compress(v, grid)  # (N, T/s^2, D) each
            q, k, v = (rearrange(z, "B L (H D) -> B H L D", H=self.num_heads) for z in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(rearrange(out, "B H L D -> B L (H D)"))  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption tokens are masked out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise UserError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, T, D) image tokens; context (N, L, D) caption tokens; mask (N, 1, 1, L) bool, True = attend."""
        q = rearrange(self.q_linear(x), "B T (H D) -> B H T D", H=self.num_heads)  # (N, H, T, Dh)
        kv = rearrange(self.kv_linear(context), "B L (K H D) -> K B H L D", K=2, H=self.num_heads)  # 2 x (N, H, L, Dh)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # (N, H, T, Dh)
        return self.proj(rearrange(out, "B H T D -> B T (H D)"))  # (N, T, D)

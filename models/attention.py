"""Multi-head self- and cross-attention on torch's scaled_dot_product_attention."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from configs.errors import UserError


class SelfAttention(nn.Module):
    """Self-attention over image tokens with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise UserError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)  # 3 x (N, H, T, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, Dh)
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

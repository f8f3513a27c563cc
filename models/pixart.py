"""PixArt-alpha and -Sigma: a diffusion transformer with cross-attention to T5 captions and adaLN-single.

The network is a pure function of (latents, timesteps, caption features, caption mask, micro-conditions).
It knows no noise schedule; losses live in diffusion/, sampling in diffusion/samplers/.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.errors import UserError
from models.aspect_ratios import nearest_multiples
from models.attention import CrossAttention, SelfAttention
from models.embeddings import (
    CaptionEmbedder,
    GuidanceEmbedder,
    SizeEmbedder,
    TimestepEmbedder,
    sincos_pos_embed_2d,
)
from models.layers import Mlp, PatchEmbed, building_on_meta, scaled_randn
from models.variants import PIXART_ARCHS, PixArtConfig

__all__ = ["PIXART_ARCHS", "BlockHook", "Conditioning", "PixArt", "PixArtBlock", "PixArtConfig", "build_pixart"]


class Modulation(NamedTuple):
    """adaLN parameters for one sub-layer: y = LN(x) * (1 + scale) + shift; the output is gated."""

    shift: torch.Tensor  # (N, 1, D)
    scale: torch.Tensor  # (N, 1, D)
    gate: torch.Tensor   # (N, 1, D)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, 1 + self.scale)


class Conditioning(NamedTuple):
    """Everything a block needs besides the image tokens, computed once per forward and passed whole to every block
    (the base's and a ControlNet's copies), so that a block variant (KV compression) sees what every block sees."""

    c: torch.Tensor            # (N, D) timestep (+ micro-condition) embedding, used by the final layer
    t6: torch.Tensor           # (N, 6D) shared adaLN-single vector, used by every block
    y: torch.Tensor            # (N, L, D) projected caption tokens
    mask: torch.Tensor | None  # (N, 1, 1, L) bool, True = attend; None = attend to all tokens
    grid: tuple[int, int]      # (h, w) token grid of the image tokens, row-major (attention over the 2-D grid needs it)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention to the caption, MLP; adaLN-single modulation of attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, kv_stride: int = 1,
                 kv_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, kv_stride, kv_norm)  # kv_stride > 1: Sigma's KV compression
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(scaled_randn(6, hidden_size, scale=hidden_size**0.5))

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (N, T, D) image tokens of the grid cond.grid; cond: the shared adaLN vector, caption tokens and mask."""
        params = (self.scale_shift_table[None] + rearrange(cond.t6, "N (K D) -> N K D", K=6)).chunk(6, dim=1)
        msa, mlp = Modulation(*params[:3]), Modulation(*params[3:])  # each (N, 1, D)
        x = x + msa.gate * self.attn(msa.apply(self.norm1(x)), cond.grid)  # (N, T, D)
        x = x + self.cross_attn(x, cond.y, cond.mask)  # (N, T, D): no norm, no gate
        x = x + mlp.gate * self.mlp(mlp.apply(self.norm2(x)))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """LN, modulation by the raw timestep embedding, linear projection to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(scaled_randn(2, hidden_size, scale=hidden_size**0.5))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)  # (N, 1, D) each
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))  # (N, T, p*p*C)


BlockHook = Callable[[int, torch.Tensor, Conditioning], torch.Tensor]  # (block index or -1, tokens, cond) -> tokens


class PixArt(nn.Module):
    """The PixArt diffusion transformer: PixArt and PixArtMS of the official alpha and Sigma code in one class (its
    variants are configs: models/variants.py)."""

    # What wrappers of a PixArt (ControlNet, compiled, DMD's networks) expose of it, the pipeline and the losses
    # reading them off any denoiser; cfg is the resolved PixArtConfig, so a wrapper answers questions about its variant.
    denoiser_attributes = ("denoiser_attributes", "cfg", "micro_conditions", "guidance_embedding", "in_channels",
                           "out_channels", "patch_size")

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        depth, hidden, heads = cfg.dims()
        self.cfg = cfg.resolved()  # the architecture, as checkpoints store it
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.hidden_size = hidden
        self.base_grid = cfg.latent_size // cfg.patch_size  # token grid the positional embedding is defined on
        self.pe_interpolation = cfg.pe_interpolation
        self.micro_conditions = cfg.micro_conditions
        self.guidance_embedding = cfg.guidance_embedding
        self.gradient_checkpointing = False  # set by trainers; recomputes block activations in backward

        self.x_embedder = PatchEmbed(patch_size=cfg.patch_size, in_chans=cfg.in_channels, embed_dim=hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, hidden, cfg.caption_tokens)
        if cfg.micro_conditions:
            if hidden % 3 != 0:
                raise UserError(f"micro-conditions split hidden_size into thirds; {hidden} is not divisible by 3")
            self.csize_embedder = SizeEmbedder(hidden // 3)  # (h, w) -> 2/3 of D
            self.ar_embedder = SizeEmbedder(hidden // 3)  # aspect ratio -> 1/3 of D
        if cfg.guidance_embedding:
            self.w_embedder = GuidanceEmbedder(hidden)  # w -> added to the timestep embedding
        compressed = set(cfg.kv_compress_blocks)
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden, heads, cfg.mlp_ratio, cfg.kv_compress_stride if i in compressed else 1,
                        cfg.kv_compress_norm)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden, cfg.patch_size, self.out_channels)
        if not building_on_meta():  # a shell for loading weights has nothing to initialise
            self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation; every zero-init below is what makes a fresh model a no-op residual."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding: xavier on the flattened conv kernel, like a linear layer.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Timestep, micro-condition and caption MLPs and the adaLN-single projection: small normal.
        embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]]
        embedders += [self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.micro_conditions:
            embedders += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2]]
            embedders += [self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for layer in embedders:
            nn.init.normal_(layer.weight, std=0.02)
        # Cross-attention output is zero, so a new block ignores the caption until it learns to use it.
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Output projection is zero, so the untrained model predicts zero noise.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # The guidance embedding starts at zero: a student built from its teacher is the teacher until it learns w.
        if self.guidance_embedding:
            nn.init.zeros_(self.w_embedder.proj.weight)

    def check_latent_size(self, height: int, width: int):
        """Raise if a latent H x W cannot be cut into patches, naming the nearest valid sizes."""
        p = self.patch_size
        if height % p or width % p or height < p or width < p:
            raise ValueError(
                f"latent size {height}x{width} is not a multiple of the patch size {p}; "
                f"nearest valid heights {nearest_multiples(height, p)}, widths {nearest_multiples(width, p)} "
                f"(images: multiples of {8 * p} pixels with the SD VAE)"
            )

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> tokens (N, T, D) with the sin-cos positional embedding added."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self.check_latent_size(x.shape[2], x.shape[3])
        gh, gw = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        pos = sincos_pos_embed_2d(self.hidden_size, gh, gw, self.base_grid, self.pe_interpolation, x.device)
        # The conv's tokens are channel-major in memory; without .contiguous() every elementwise op downstream
        # keeps that layout and the cross-attention matmuls run on a strided input (10x slower in bf16 on CPU).
        return self.x_embedder(x).contiguous() + pos.to(x.dtype)  # (N, T, D)

    def condition(
        self,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        drop_caption: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        grid: tuple[int, int] = (0, 0),
    ) -> Conditioning:
        """Timestep, micro-condition, guidance and caption embeddings shared by all blocks (and ControlNet copies);
        grid (h, w) is the token grid of the image tokens they will see."""
        n = y.shape[0]
        t = t.expand(n) if t.ndim == 0 or t.shape[0] == 1 else t
        c = self.t_embedder(t)  # (N, D)
        if self.guidance_embedding:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (an LCM student distilled with w as input): "
                                 "pass guidance (N,), the w it should follow (sample.guidance)")
            c = c + self.w_embedder(guidance.reshape(-1).expand(n))  # (N, D)
        elif guidance is not None:
            raise ValueError("guidance was given but this model has no guidance embedding: use classifier-free "
                             "guidance instead")
        if self.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this is a multi-scale (MS) model: pass resolution (N, 2) as (height, width) "
                                 "in pixels and aspect_ratio (N, 1) as height / width")
            sizes = self.csize_embedder(resolution.reshape(n, 2))  # (N, 2D/3)
            ratio = self.ar_embedder(aspect_ratio.reshape(n, 1))  # (N, D/3)
            c = c + torch.cat([sizes, ratio], dim=1)  # (N, D)
        if y.ndim != 3 or y.shape[-1] != self.y_embedder.y_proj.fc1.in_features:
            raise ValueError(f"expected caption features (N, L, {self.y_embedder.y_proj.fc1.in_features}), "
                             f"got {tuple(y.shape)}")
        if mask is not None:
            mask = mask.to(torch.bool)[:, None, None, :]  # (N, 1, 1, L)
        return Conditioning(c=c, t6=self.t_block(c), y=self.y_embedder(y, drop_caption), mask=mask, grid=tuple(grid))

    def run_block(self, block: "int | PixArtBlock", x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """A block (an index into self.blocks, or any PixArtBlock, e.g. a ControlNet copy) on tokens x (N, T, D)
        with this model's conditioning, with activation checkpointing when enabled and training."""
        block = self.blocks[block] if isinstance(block, int) else block
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, cond, use_reentrant=False)
        return block(x, cond)

    def run_blocks(self, tokens: torch.Tensor, cond: Conditioning, hook: "BlockHook | None" = None) -> torch.Tensor:
        """Every block in order. hook(i, tokens, cond) -> tokens runs after block i, and with i = -1 before block 0:
        the one seam through which a ControlNet reads and changes the base's tokens (models/controlnet.py)."""
        if hook is not None:
            tokens = hook(-1, tokens, cond)
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, cond)  # (N, T, D)
            if hook is not None:
                tokens = hook(i, tokens, cond)
        return tokens

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Tokens (N, T, p*p*C) -> image (N, C, H, W)."""
        p = self.patch_size
        return rearrange(x, "N (h w) (p q C) -> N C (h p) (w q)", h=grid_h, w=grid_w, p=p, q=p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        drop_caption: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        block_hook: "BlockHook | None" = None,
    ) -> torch.Tensor:
        """Predict noise (and variance interpolation) for latents x (N, C, H, W) at timesteps t (N,).

        y (N, L, caption_channels) T5 features; mask (N, L) 1 = real token, 0 = padding;
        resolution (N, 2) and aspect_ratio (N, 1) only for micro-conditioned (MS) models;
        drop_caption (N,) bool replaces those captions by the learned null caption (CFG training/sampling);
        guidance (N,) the guidance scale w, only for models with a guidance embedding;
        block_hook see run_blocks (a ControlNet's injection).
        Returns (N, out_channels, H, W).
        """
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.embed_image(x)  # (N, T, D)
        cond = self.condition(t, y, mask, resolution, aspect_ratio, drop_caption, guidance, (grid_h, grid_w))
        tokens = self.run_blocks(tokens, cond, block_hook)  # (N, T, D)
        out = self.final_layer(tokens, cond.c)  # (N, T, p*p*C_out)
        return self.unpatchify(out, grid_h, grid_w)  # (N, C_out, H, W)


def identity_block_positions(depth: int, new_depth: int) -> list[int]:
    """Where a deepened model's new blocks go (indices into its new_depth blocks): spread evenly, one after every
    depth / extra blocks of the original (6 -> 8: after blocks 3 and 6, at indices 3 and 7)."""
    extra = new_depth - depth
    after = [round((k + 1) * depth / extra) for k in range(extra)]  # original blocks each new one follows
    return [a + k for k, a in enumerate(after)]


def deepened(net: PixArt, new_depth: int) -> PixArt:
    """A copy of `net` with new_depth blocks: its own blocks in order, and new ones (identity_block_positions) whose
    three output projections (self-attention, cross-attention, MLP) are zero, so each new block passes its tokens
    through unchanged and the copy computes exactly what `net` does; training then uses the new blocks as capacity.
    Its cfg (what checkpoints store) says new_depth."""
    depth = len(net.blocks)
    if new_depth < depth:
        raise UserError(f"cannot deepen a {depth}-block model to {new_depth} blocks")
    if net.cfg.kv_compress_blocks and new_depth > depth:
        raise UserError("deepening a model with KV-compressed blocks (PixArt-Sigma's kv_compress_blocks) is not "
                        "supported: the new blocks' positions would move the compressed ones")
    device = next(net.parameters()).device
    out = build_pixart(replace(net.cfg, depth=new_depth), device).to(next(net.parameters()).dtype)
    new = set(identity_block_positions(depth, new_depth)) if new_depth > depth else set()
    old = iter(net.blocks)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.")}
    for i in range(new_depth):
        block = out.blocks[i] if i in new else next(old)
        if i in new:
            for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        state.update({f"blocks.{i}.{k}": v for k, v in block.state_dict().items()})
    out.load_state_dict(state)
    return out


def build_pixart(cfg: PixArtConfig, device: torch.device | str | None = None) -> PixArt:
    """Build a randomly initialised PixArt; device="meta" gives a shell for checkpoint loading."""
    with torch.device(device or "cpu"):
        return PixArt(cfg)

"""ControlNet for PixArt (PixArt-delta section 4): a trainable branch beside a frozen base model.

The branch holds N trainable copies of the base's first N blocks, each with zero-initialised projections, so an
untrained branch changes nothing. The control image is encoded by the same autoencoder as the image and embedded
by the base's frozen patch embedder plus the positional embedding; the copies share the base's caption tokens and
adaLN-single vector. The branch never copies the base's forward: it reads and changes the base's tokens through
PixArt.run_blocks' hook and runs its copies with PixArt.run_block (so gradient checkpointing is the base's).

Designs (`control.design`), one small class each, registered in DESIGNS:

  transformer  PixArt-delta's ControlNet-Transformer. After base block 0, copy 0 reads x + before_proj(c); copy i
               reads copy i-1's output; after_proj_i(copy i) is added to the tokens entering base block i+1.
  unet         the ControlNet-UNet baseline of the paper's ablation: the copies form an encoder on the embedded
               input + before_proj(c), and after_proj_i(copy i) is added to the tokens entering base block
               depth-1-i (mirrored, like a UNet's skip connections).

Official checkpoint layout (PixArt-XL-2-*-ControlNet.pth, N = 13): base_model.<base keys>, and
controlnet.<i>.copied_block.<block keys>, controlnet.0.before_proj.*, controlnet.<i>.after_proj.*; the branch's
own state dict uses exactly the controlnet.* names.

    base, _, _ = load_checkpoint("teacher.safetensors")
    model = ControlledPixArt(base, build_branch(base, ControlConfig(design="transformer", num_blocks=13)))
    eps = model(x, t, y, mask, control=control_latents, control_scale=1.0)
"""

import copy
import logging
import re
from pathlib import Path

import torch
from torch import nn

from models.config import ControlConfig, ControlError
from models.pixart import BlockHook, Conditioning, PixArt, PixArtBlock

FORMAT = "pixart-delta-control/1"
log = logging.getLogger(__name__)






def zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ControlBlock(nn.Module):
    """A trainable copy of one base block and its zero-initialised projection(s) (official names)."""

    def __init__(self, block: PixArtBlock, width: int, first: bool):
        super().__init__()
        self.copied_block = copy.deepcopy(block).requires_grad_(True)
        if first:
            self.before_proj = zero_linear(width)  # the control tokens into the first copy
        self.after_proj = zero_linear(width)       # the copy's output into the base


class ControlBranch(nn.Module):
    """N copies of the base's first N blocks; a design says where they read and where they write."""

    design = ""

    def __init__(self, base: PixArt, num_blocks: int):
        super().__init__()
        ControlConfig(self.design, num_blocks).check(len(base.blocks))
        self.depth = len(base.blocks)
        self.controlnet = nn.ModuleList(ControlBlock(base.blocks[i], base.hidden_size, i == 0)
                                        for i in range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.controlnet)

    def hook(self, base: PixArt, control: torch.Tensor, scale: float) -> BlockHook:
        """The function PixArt.run_blocks calls between blocks, for control tokens (N, T, D) of this forward."""
        raise NotImplementedError


class TransformerBranch(ControlBranch):
    """PixArt-delta's ControlNet-Transformer: copy i runs after base block i and feeds base block i+1."""

    design = "transformer"

    def hook(self, base: PixArt, control: torch.Tensor, scale: float) -> BlockHook:
        state = {}

        def after_block(i: int, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            if not 0 <= i < self.num_blocks:
                return x
            copy_i = self.controlnet[i]
            h = x + copy_i.before_proj(control) if i == 0 else state["h"]
            state["h"] = base.run_block(copy_i.copied_block, h, cond)  # (N, T, D)
            return x + scale * copy_i.after_proj(state["h"])

        return after_block


class UNetBranch(ControlBranch):
    """The ControlNet-UNet baseline: the copies encode the embedded input + control, and copy i's output enters
    base block depth-1-i, like a UNet's skip connections in mirrored order."""

    design = "unet"

    def hook(self, base: PixArt, control: torch.Tensor, scale: float) -> BlockHook:
        skips = []

        def after_block(i: int, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            if i == -1:  # the embedded input: run the whole encoder of copies once
                h = x + self.controlnet[0].before_proj(control)
                for block in self.controlnet:
                    h = base.run_block(block.copied_block, h, cond)
                    skips.append(block.after_proj(h))
            j = self.depth - 2 - i  # the skip that enters the next block, depth-1-j = i+1
            return x + scale * skips[j] if 0 <= j < len(skips) else x

        return after_block


DESIGNS: dict[str, type[ControlBranch]] = {"transformer": TransformerBranch, "unet": UNetBranch}


def build_branch(base: PixArt, cfg: ControlConfig) -> ControlBranch:
    """A fresh branch for `base`: copies of its current block weights, zero projections."""
    cfg.check(len(base.blocks))
    return DESIGNS[cfg.design](base, cfg.num_blocks)


class ControlledPixArt(nn.Module):
    """A frozen base PixArt steered by a control branch. Without `control` it is exactly the base model."""

    def __init__(self, base_model: PixArt, branch: ControlBranch):
        super().__init__()
        self.base_model = base_model.requires_grad_(False)
        self.branch = branch
        # What the pipeline and the loss read from a denoiser.
        for name in base_model.denoiser_attributes:
            setattr(self, name, getattr(base_model, name))

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_model.eval()  # frozen: no dropout, whatever the branch does
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *,
                control: torch.Tensor | None = None, control_scale: float = 1.0, **conditions) -> torch.Tensor:
        """The base's forward (same arguments) with control latents (N, C, H, W) of x's shape injected."""
        if control is None:
            return self.base_model(x, t, y, mask, **conditions)
        if control.shape != x.shape:
            raise ValueError(f"control latents {tuple(control.shape)} must have the shape of the latents "
                             f"{tuple(x.shape)}: encode the control image at the generated size")
        tokens = self.base_model.embed_image(control.to(x.dtype))  # frozen patch embedder + positions
        hook = self.branch.hook(self.base_model, tokens, control_scale)
        return self.base_model(x, t, y, mask, block_hook=hook, **conditions)


# ----------------------------------------------------------------------------------------------------------
# Files: the branch alone (this project), or base + branch in the official layout

def branch_metadata(branch: ControlBranch, base: PixArt, base_sha256: str | None) -> dict[str, str]:
    return {"format": FORMAT, "design": branch.design, "num_blocks": str(branch.num_blocks),
            "hidden_size": str(base.hidden_size), "depth": str(len(base.blocks)), "base_sha256": base_sha256 or ""}


def save_branch(branch: ControlBranch, base: PixArt, path: str | Path, base_sha256: str | None = None,
                extra: dict[str, str] | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """The branch alone as safetensors (the frozen base is referenced by its hash, not copied)."""
    from common.files import atomic_path
    from common.safetensors_file import save_file

    state = branch.state_dict() if state is None else state
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                  metadata={**branch_metadata(branch, base, base_sha256), **(extra or {})})


_INDEX = re.compile(r"^controlnet\.(\d+)\.")


def split_official(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """An official ControlNet state dict -> (base state with official keys, branch state with controlnet.* keys)."""
    base = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    branch = {k: v for k, v in state.items() if k.startswith("controlnet.")}
    other = sorted(k for k in state if not k.startswith(("base_model.", "controlnet.")))
    if other or not branch:
        raise ControlError(f"not an official PixArt ControlNet state dict (base_model.* and controlnet.* keys): "
                           f"{'no controlnet.* keys' if not branch else f'unexpected keys {other[:5]}'}")
    return base, branch


def join_official(base_state: dict[str, torch.Tensor], branch_state: dict[str, torch.Tensor]) -> dict:
    """Base + branch in the official layout (what PixArt's ControlNet .pth files hold)."""
    return {**{f"base_model.{k}": v for k, v in base_state.items()}, **branch_state}


def read_branch(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor] | None]:
    """(branch state, metadata, base state or None) from this project's branch file or an official .pth."""
    from models.shipped import ShippedWeightsError, verify_shipped

    path = Path(path)
    try:
        verify_shipped(path)  # a branch that lives in the repository: present and unchanged
    except ShippedWeightsError as e:
        raise ControlError(str(e)) from e
    if not path.is_file():
        raise ControlError(f"control checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ControlError(f"cannot read control checkpoint {path}: {e} (corrupt or truncated?)") from e
        if meta.get("format") != FORMAT:
            raise ControlError(f"{path} is not a control branch of this project (metadata format "
                               f"{meta.get('format')!r}, expected {FORMAT!r}); a transformer checkpoint goes to "
                               f"sample.checkpoint, a branch to control.checkpoint")
        return state, meta, None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ControlError(f"cannot read control checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from e
    raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ControlError(f"{path} holds no state dict")
    base, branch = split_official(raw)
    return branch, {"design": "transformer"}, base  # the released ControlNets are all ControlNet-Transformers


def branch_design(path: str | Path) -> tuple[str, int]:
    """(design, N) a branch file was trained with, from its header (safetensors) or its keys (official .pth)."""
    from models.shipped import ShippedWeightsError, verify_shipped

    path = Path(path)
    try:
        verify_shipped(path)
    except ShippedWeightsError as e:
        raise ControlError(str(e)) from e
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ControlError(f"cannot read control checkpoint {path}: {e} (corrupt or truncated?)") from e
        if meta.get("format") == FORMAT:
            return meta["design"], int(meta["num_blocks"])
    state, meta, _ = read_branch(path)
    return meta["design"], branch_shape(state)[0]


def branch_shape(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(N copies, width) of a branch state dict."""
    indices = {int(m.group(1)) for k in state if (m := _INDEX.match(k))}
    if not indices or sorted(indices) != list(range(len(indices))):
        raise ControlError(f"branch copies must be numbered 0..N-1, found {sorted(indices)[:10]}")
    return len(indices), state["controlnet.0.after_proj.weight"].shape[0]


def load_branch(path: str | Path, base: PixArt, cfg: ControlConfig, base_sha256: str | None = None
                ) -> ControlBranch:
    """The branch of `path` for `base`, checked against the config and the base: N, design, width and, when the
    file records it, the hash of the base it was trained on."""
    state, meta, _ = read_branch(path)
    n, width = branch_shape(state)
    problems = []
    if n != cfg.num_blocks:
        problems.append(f"it has N = {n} copied blocks, the config control.num_blocks = {cfg.num_blocks}")
    if meta.get("design", cfg.design) != cfg.design:
        problems.append(f"its design is {meta['design']!r}, the config control.design = {cfg.design!r}")
    if width != base.hidden_size:
        problems.append(f"its width is {width}, the base model's hidden_size is {base.hidden_size}")
    recorded = meta.get("base_sha256")
    if recorded and base_sha256 and recorded != base_sha256:
        if cfg.check_base:
            problems.append(f"it was trained on a base model with sha256 {recorded[:12]}..., this base is "
                            f"{base_sha256[:12]}... (another model: use the branch's own base, or --set "
                            f"control.check_base=false for a model derived from it, like its LCM student)")
        else:
            log.warning("control branch %s was trained on another base (sha256 %s...); using it on this one as asked "
                        "(control.check_base=false)", path, recorded[:12])
    if problems:
        raise ControlError(f"control checkpoint {path} does not fit: " + "; ".join(problems))
    branch = build_branch(base, cfg)
    missing, unexpected = branch.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ControlError(f"control checkpoint {path}: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}")
    return branch

"""The `sample:` section of a run config: how to generate (command-line flags of sample/sample.py override it).

Importing it loads nothing heavy, so reading a config stays cheap.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from common.choices import check_choices
from common.errors import UserError

Sampler = Literal["dpm", "lcm", "ddim"]
DType = Literal["fp32", "bf16", "fp16"]
Quantize = Literal["none", "int8", "fp8"]
ControlType = Literal["none", "canny", "hed"]
Uncond = Literal["null", "negative"]
CompileScope = Literal["blocks", "model"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
UNCOND_MODES = Uncond.__args__
COMPILE_SCOPES = CompileScope.__args__
SEED_LIMIT = 2**63 - 1_000_004  # torch generators take 64-bit seeds; stochastic samplers add 1,000,003


@dataclass
class SampleConfig:
    """How to generate; the `sample:` section of a run config (command-line flags override it)."""

    checkpoint: str | None = None        # transformer weights: official .pth, diffusers folder or .safetensors
    sampler: Sampler = "dpm"             # dpm | lcm | ddim (diffusion/samplers)
    steps: int = 20                      # denoiser evaluations (LCM: 1-8 typical, at most 50)
    guidance: float = 4.5                # CFG scale w: eps_u + w (eps_c - eps_u); w <= 1 turns guidance off (for a
                                         # student with a guidance embedding: its input w, no CFG)
    uncond: Uncond = "null"              # null: learned null caption (official) | negative: encoded negative_prompt
    negative_prompt: str = ""            # the unconditional prompt when uncond is "negative"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # e.g. {order: 3} for dpm, {eta: 1.0} for ddim
    seed: int = 0                        # image i of the run uses seed + i
    images_per_prompt: int = 1
    batch_size: int = 1                  # images per transformer batch
    width: int | None = None             # output pixels; None: from aspect_ratio, else the model's base size
    height: int | None = None
    aspect_ratio: str | None = None      # "W:H" (e.g. "16:9") at about the base area, when width/height are unset
    resolution_binning: bool = True      # generate at the closest aspect-ratio bin, then resize/crop to width x height
    max_pixels: int = 4096 * 4096        # larger requested images are refused before anything loads
    device: str = "cpu"                  # cpu | cuda | cuda:N
    dtype: DType = "fp32"                # transformer dtype: fp32 | bf16 | fp16
    low_memory: bool = False             # the 8 GB recipe: T5 in 8 bit, VAE decodes one image at a time
    quantize: Quantize = "none"          # none | int8 (transformer blocks w8a8, T5 int8 weights) | fp8 (CUDA, sm89+);
                                         # see models/quantize.py
    compile: bool = False                # torch.compile the transformer and the VAE decoder (eager fallback)
    compile_scope: CompileScope = "blocks"  # blocks: each transformer block compiled (seconds) | model: one whole graph
    compile_mode: CompileMode = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
                                         # | max-autotune-no-cudagraphs
    out_dir: str = "outputs"             # each run writes a numbered folder inside
    grid: bool = True                    # also write grid.png
    control: str | None = None           # a control image (with control.checkpoint: ControlNet-steered generation)
    control_type: ControlType = "none"   # none: the image is the map | canny | hed: extract edges from it
    hed_weights: str | None = None       # ControlNetHED.pth, for control_type hed
    strict_control: bool = False         # refuse a control image of another size instead of resizing it

    def validate(self) -> None:
        """Values that would fail late, or silently give black or huge images (the loader calls it; so does the
        sample plan, after command-line flags)."""
        check_choices(self, "sample")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise UserError(f"sample.guidance must be a finite number >= 0 (<= 1: no guidance), got {self.guidance}")
        for name, value in (("images_per_prompt", self.images_per_prompt), ("batch_size", self.batch_size)):
            if value < 1:
                raise UserError(f"sample.{name} must be >= 1, got {value}")
        if not 0 <= self.seed <= SEED_LIMIT:
            raise UserError(f"sample.seed must be in 0..{SEED_LIMIT}, got {self.seed}")
        for name, side in (("width", self.width), ("height", self.height)):
            if side is not None and side < 1:
                raise UserError(f"sample.{name} (--{name}) must be a positive number of pixels, got {side}")
        if self.aspect_ratio is not None and (self.width is not None or self.height is not None):
            raise UserError(f"both a size ({self.width}x{self.height}) and an aspect ratio ({self.aspect_ratio}) were "
                            f"given: pass either --width/--height or --aspect-ratio, not both")
        if (self.width or 1) * (self.height or 1) > self.max_pixels:
            raise UserError(f"{self.width}x{self.height} is {self.width * self.height:,} pixels, more than "
                            f"sample.max_pixels ({self.max_pixels:,}); ask for a smaller image or raise the limit with "
                            f"--set sample.max_pixels=N")

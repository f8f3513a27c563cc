"""The `sample:` section of a run config: how to generate (command-line flags of sample/sample.py override it).

Importing it loads nothing heavy, so reading a config stays cheap.
"""

from dataclasses import dataclass, field
from typing import Any

UNCOND_MODES = ("null", "negative")
COMPILE_SCOPES = ("blocks", "model")


@dataclass
class SampleConfig:
    """How to generate; the `sample:` section of a run config (command-line flags override it)."""

    checkpoint: str | None = None        # transformer weights: official .pth, diffusers folder or .safetensors
    sampler: str = "dpm"                 # dpm | lcm | ddim
    steps: int = 20                      # denoiser evaluations (LCM: 1-8 typical, at most 50)
    guidance: float = 4.5                # CFG scale w: eps_u + w (eps_c - eps_u); w <= 1 turns guidance off (for a
                                         # student with a guidance embedding: its input w, no CFG)
    uncond: str = "null"                 # null: learned null caption (official) | negative: encoded negative_prompt
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
    dtype: str = "fp32"                  # transformer dtype: fp32 | bf16 | fp16
    low_memory: bool = False             # the 8 GB recipe: T5 in 8 bit, VAE decodes one image at a time
    quantize: str = "none"               # none | int8 (transformer blocks w8a8, T5 int8 weights) | fp8 (CUDA, sm89+);
                                         # see models/quantize.py
    compile: bool = False                # torch.compile the transformer and the VAE decoder (eager fallback)
    compile_scope: str = "blocks"        # blocks: each transformer block compiled (seconds) | model: one whole graph
    compile_mode: str = "default"        # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
                                         # | max-autotune-no-cudagraphs
    out_dir: str = "outputs"             # each run writes a numbered folder inside
    grid: bool = True                    # also write grid.png
    control: str | None = None           # a control image (with control.checkpoint: ControlNet-steered generation)
    control_type: str = "none"           # none: the image is the map | canny | hed: extract edges from it
    hed_weights: str | None = None       # ControlNetHED.pth, for control_type hed
    strict_control: bool = False         # refuse a control image of another size instead of resizing it

"""The models/ sections of a run config besides `model:` (models/variants.py): `autoencoder:`, `text_encoder:`,
`control:`. Plain dataclasses that import no torch, so reading a config stays cheap; the code they configure
(autoencoder.py, text_encoder.py, controlnet.py) imports them from here."""

import math
from dataclasses import dataclass
from typing import Literal

from common.choices import check_choices
from common.errors import UserError

DType = Literal["fp32", "bf16", "fp16"]
AutoencoderKind = Literal["sd-vae", "pixel"]  # sd-vae: a diffusers AutoencoderKL (SD or SDXL VAE); pixel: identity
ControlDesign = Literal["transformer", "unet"]
MAX_SCALE = 2.0  # control residuals scaled further push the base out of its training distribution: noise, then NaN


class AutoencoderError(UserError):
    """An autoencoder that cannot be found or is not a VAE; the message names the path and what would be right."""


class ControlError(UserError):
    """A control branch that does not fit its config or base model; the message names the difference."""


@dataclass
class AutoencoderConfig:
    """Which autoencoder maps images to the latents the transformer sees; the `autoencoder:` section of a config."""

    kind: AutoencoderKind = "sd-vae"        # sd-vae (diffusers AutoencoderKL) | pixel (identity: latent = image)
    path: str = "sd-vae-ft-ema"    # AutoencoderKL folder, pipeline root with vae/, or a cached hub id
    scale: float | None = None     # latent = scale * VAE latent; None: the VAE config's scaling_factor (0.18215)
    dtype: DType = "fp32"           # fp32 | bf16 | fp16

    def validate(self) -> None:
        check_choices(self, "autoencoder", AutoencoderError)


@dataclass
class TextEncoderConfig:
    """Which T5 encoder turns captions into features, and how; the `text_encoder:` section of a run config."""

    path: str = "t5-v1_1-xxl"     # T5 + tokenizer folder, pipeline root (text_encoder/, tokenizer/), cached hub id
    max_tokens: int = 120         # captions are padded / truncated to this many tokens (PixArt-alpha: 120)
    clean_captions: bool = True   # lower-case and strip URLs, HTML, @mentions, junk punctuation before tokenizing
    dtype: DType = "bf16"         # fp32 | bf16 | fp16 (T5-v1.1 overflows in fp16: prefer bf16)
    load_in_8bit: bool = False    # int8 Linear weights (torchao weight-only, CPU and CUDA): half of bf16 memory
    cache_dir: str | None = None  # folder of cached caption embeddings (one safetensors file per prompt)

    def validate(self) -> None:
        check_choices(self, "text_encoder")
        if self.max_tokens < 1:
            raise UserError(f"text_encoder.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class ControlConfig:
    """The `control:` section: which branch, and how strongly it steers at sampling time."""

    design: ControlDesign = "transformer"  # transformer | unet (models/controlnet.py DESIGNS)
    num_blocks: int = 13             # N copies of the base's first N blocks (the released model: 13 of 28)
    base: str | None = None          # training: the frozen base model's checkpoint (any format)
    checkpoint: str | None = None    # sampling: a branch file (this project's safetensors, or an official .pth);
                                     # training starts a fresh branch (train.init_from: from a trained one)
    scale: float = 1.0               # conditioning scale: multiplies every injected residual at sampling time
    check_base: bool = True          # refuse a branch recorded for another base; false: a model derived from that
                                     # base (e.g. the LCM student of the teacher the branch was trained on)
    caption_conflict_prob: float = 0.0   # training: share of captions replaced by one naming another kind at another
                                     # place for each object (same colours and sizes) while the image and its map stay:
                                     # the branch learns that the map, not the caption, decides kind and place
                                     # (captions of the synthetic shapes set only)
    caption_colour_only_prob: float = 0.0  # training: share of captions replaced by "a COLOUR shape" per object

    def check(self, depth: int) -> None:
        """validate(), and the branch's depth against its base's."""
        self.validate()
        if not 1 <= self.num_blocks <= depth:
            raise ControlError(f"control.num_blocks={self.num_blocks} must be in 1..{depth} (the base model's depth)")

    def validate(self) -> None:
        check_choices(self, "control", ControlError)
        probs = (self.caption_conflict_prob, self.caption_colour_only_prob)
        if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs) or sum(probs) > 1:
            raise ControlError(f"control.caption_conflict_prob and control.caption_colour_only_prob must be in 0..1 "
                               f"with a sum of at most 1, got {probs[0]} and {probs[1]}")
        if not (math.isfinite(self.scale) and 0 <= self.scale <= MAX_SCALE):
            raise ControlError(f"the control scale (--control-scale, control.scale) must be a number in "
                               f"0..{MAX_SCALE:g} (0: the control is off, 1: the strength it was trained at), got "
                               f"{self.scale}")

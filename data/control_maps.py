"""Control maps for ControlNet: images in, 3-channel maps in [-1, 1] out (white structure on black).

    control = control_map(load_image("photo.png"), "canny", (512, 512))   # (3, 512, 512)
    control = control_map(load_image("edges.png"), "none", (512, 512))    # the file already is the map

Kinds: `none` (the image is the map: edges, depth, pose... any map a branch was trained on drops in), `canny`
(data/edges.py, the same settings tools/extract_features.py --control canny uses for training), `hed` (soft edges
of the HED network, models/hed.py, from the user's ControlNetHED.pth: what PixArt-delta's ControlNet was trained
on). A map whose size differs from the generated image is resized (bilinear) with a warning, or refused when
strict.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError
from data.edges import canny, edges_to_control

log = logging.getLogger(__name__)

CANNY = {"sigma": 1.0, "low": 0.1, "high": 0.2}  # what training caches use (tools/extract_features.py)
KINDS = ("none", "canny", "hed")
EMPTY_SHARE = 0.001  # a map with fewer bright pixels than this carries no structure: the branch adds (almost) nothing
FULL_SHARE = 0.5     # edges cover at most a few tenths of a real edge map (the synthetic set's: 2-15%)


class ControlMapError(UserError):
    """A control image that cannot be used; the message names the fix."""


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def control_map(image: Image.Image, kind: str, size: tuple[int, int], strict: bool = False,
                name: str = "the control image", hed_weights: str | None = None) -> torch.Tensor:
    """The control map (3, height, width) in [-1, 1] of `image` for an image of size (height, width).

    Grayscale and RGBA inputs are fine (load_image composites transparency over white and expands gray to RGB)."""
    if kind not in KINDS:
        raise ControlMapError(f"unknown control type {kind!r}: use one of {', '.join(KINDS)}")
    height, width = size
    x = image_to_tensor(image)  # (3, h, w) in [0, 1]
    if kind == "canny":
        x = (edges_to_control(canny(x, **CANNY)) + 1) / 2  # (3, h, w) in {0, 1}
    elif kind == "hed":
        from models.hed import hed_edges, load_hed

        if not hed_weights:
            raise ControlMapError("--control-type hed needs the HED weights: --hed-weights ControlNetHED.pth "
                                  "(hub repo lllyasviel/Annotators; nothing is downloaded)")
        x = hed_edges(load_hed(hed_weights), x[None])[0].expand(3, -1, -1)  # (3, h, w) in [0, 1]
    if tuple(x.shape[-2:]) != (height, width):
        message = (f"{name} is {x.shape[-1]}x{x.shape[-2]} (WxH) but the image is generated at {width}x{height}")
        if strict:
            raise ControlMapError(f"{message}: give a control map of that size (or drop --strict-control to resize)")
        log.warning("%s: resizing it", message)
        x = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp(0, 1)
    warn_about_coverage(x, name)
    return x * 2 - 1


def warn_about_coverage(x: torch.Tensor, name: str) -> float:
    """Warn when a (3, H, W) map in [0, 1] is blank or covered nearly everywhere; returns its bright share.

    Either way the map does not say where anything goes: a blank one (all black) leaves the base model to the
    caption, and one that is bright almost everywhere (all white, an inverted edge map, a photo given as `none`)
    pushes the branch far outside what it was trained on."""
    share = float((x.mean(0) > 0.5).float().mean())
    if share < EMPTY_SHARE:
        log.warning("%s carries no edges (%.2f%% of its pixels are bright): the control will not steer the image; "
                    "give a map with white structure on black (or --control-type canny for a photo)", name,
                    100 * share)
    elif share > FULL_SHARE:
        log.warning("%s is bright on %.0f%% of its pixels, not an edge map of white lines on black: invert it, or "
                    "pass the photo with --control-type canny", name, 100 * share)
    return share

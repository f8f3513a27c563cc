"""Aspect-ratio bins: the image sizes PixArt trains and samples at, about base_size^2 pixels each.

One table serves every base size. Each bin is (height, width) in 1/16ths of the base side: at base 256 the
bins are multiples of 16 px, at 1024 multiples of 64 px (the official and diffusers tables for 256, 512 and
1024 px are this table times 16, 32 and 64).
"""

import torch
import torch.nn.functional as F

# ratio key (height / width, as the official tables name it) -> (height, width) in units of base_size / 16
_BINS_IN_SIXTEENTHS = {
    "0.25": (8, 32), "0.28": (8, 29), "0.32": (9, 28), "0.33": (9, 27), "0.35": (9, 26), "0.4": (10, 25),
    "0.42": (10, 24), "0.48": (11, 23), "0.5": (11, 22), "0.52": (11, 21), "0.57": (12, 21), "0.6": (12, 20),
    "0.68": (13, 19), "0.72": (13, 18), "0.78": (14, 18), "0.82": (14, 17), "0.88": (15, 17), "0.94": (15, 16),
    "1.0": (16, 16), "1.07": (16, 15), "1.13": (17, 15), "1.21": (17, 14), "1.29": (18, 14), "1.38": (18, 13),
    "1.46": (19, 13), "1.67": (20, 12), "1.75": (21, 12), "2.0": (22, 11), "2.09": (23, 11), "2.4": (24, 10),
    "2.5": (25, 10), "3.0": (27, 9), "4.0": (32, 8),
}


def aspect_ratio_bins(base_size: int, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """{ratio key: (height, width)} in pixels for a base side, each side rounded to a multiple of `multiple`."""
    unit = base_size / 16
    snap = lambda v: max(multiple, round(v * unit / multiple) * multiple)  # noqa: E731
    return {key: (snap(h), snap(w)) for key, (h, w) in _BINS_IN_SIXTEENTHS.items()}


def nearest_multiples(value: int, multiple: int) -> list[int]:
    """The multiples of `multiple` just below and above `value` (at least `multiple`), for error messages."""
    return sorted({max(multiple, value // multiple * multiple), max(multiple, -(-value // multiple) * multiple)})


def closest_bin(height: int, width: int, bins: dict[str, tuple[int, int]]) -> tuple[str, tuple[int, int]]:
    """The bin whose ratio key is closest to height / width (PixArt's resolution binning)."""
    ratio = height / width
    key = min(bins, key=lambda k: abs(float(k) - ratio))
    return key, bins[key]


def resize_and_center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (N, C, h, w) to cover height x width with bilinear filtering, then center-crop to it."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[..., top:top + height, left:left + width]

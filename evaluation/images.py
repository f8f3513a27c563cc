"""Read image files for evaluation as RGB uint8, saying how each was converted; refuse what cannot be read right.

    image = read_rgb(path, min_side=32)      # LoadedImage(pixels (H, W, 3) uint8, note or None)

- Transparent pixels (an alpha channel or a transparent palette colour) are composited over white, the renderer's
  background, and noted; a fully opaque alpha channel is dropped and noted.
- 16 bits per channel: RGB is read at 8 bits (the high byte, as Pillow does) and noted; 16-bit greyscale, which
  Pillow would clip to white, is scaled to 8 bits (value / 257) and noted.
- Floating-point images, images Pillow cannot open and images smaller than `min_side` are refused with a message
  that names the file and the fix.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import UserError


class ImageInputError(UserError):
    """An image file that cannot be evaluated; the message names it and the fix."""


@dataclass(frozen=True)
class LoadedImage:
    """An image as the evaluators read it, and how the file was made RGB uint8 (None: it was already)."""

    pixels: np.ndarray         # (H, W, 3) uint8
    note: str | None = None


def _bit_depth_16(image: Image.Image) -> bool:
    """Whether Pillow decodes this file from 16 bits per channel (its raw mode says so before loading)."""
    return any(str(tile[3] if len(tile) > 3 else "").endswith(("16", "16B", "16L")) for tile in (image.tile or []))


def _to_rgb(image: Image.Image, path: Path) -> LoadedImage:
    notes = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if values.min() < 0 or values.max() > 65535:
            raise ImageInputError(f"{path}: 32-bit integer pixels outside 0..65535 cannot be read as colours; save "
                                  f"it as an 8-bit RGB PNG")
        grey = np.round(values / 257).astype(np.uint8)
        return LoadedImage(np.repeat(grey[..., None], 3, axis=2), "16-bit greyscale: scaled to 8 bits")
    if image.mode == "F":
        raise ImageInputError(f"{path}: floating-point pixels (mode F) are not an image the evaluator reads; save "
                              f"it as an 8-bit RGB PNG")
    if _bit_depth_16(image):
        notes.append("16 bits per channel: read at 8 bits")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)  # (H, W, 4)
        alpha = rgba[..., 3:] / 255.0
        if alpha.min() < 1.0:
            pixels = np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
            notes.append("transparent pixels: composited over white")
        else:
            pixels = rgba[..., :3].astype(np.uint8)
            notes.append("opaque alpha channel: dropped")
        return LoadedImage(pixels, "; ".join(notes))
    return LoadedImage(np.array(image.convert("RGB")), "; ".join(notes) or None)


def read_rgb(path: str | Path, min_side: int | None = None) -> LoadedImage:
    """The image file as RGB uint8 (H, W, 3) and a note of any conversion; min_side: refuse smaller images."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min_side is not None and min(width, height) < min_side:
                raise ImageInputError(f"{path} is {width}x{height} pixels: the shapes reader needs at least "
                                      f"{min_side}x{min_side} (its smallest shape spans a fifth of the shorter side); "
                                      f"evaluate images of {min_side} pixels or more, or leave this one out")
            return _to_rgb(image, path)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ImageInputError(f"cannot read image {str(path)!r}: {e}") from e

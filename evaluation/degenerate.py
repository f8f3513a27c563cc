"""Images an evaluator must not be fooled by: degenerate images that hold no object, and renders damaged so that
their object is no longer the one they were drawn from.

The shapes reader's acceptance thresholds (evaluation/shapes.py) were chosen against these (docs/RESULTS.md, "The
evaluator"), and the tests check what each is read as.

    for name, image in degenerate_images(np.random.default_rng(0), sides=(32, 64)): ...
    blurred = box_blur(render([obj], 64, 64), radius=2)
"""

import numpy as np
from PIL import Image, ImageFilter

from data.synthetic import PALETTE, ShapeObject, render

DEGENERATE_KINDS = ("black", "white", "grey", "dark grey", "light grey", "flat colour", "uniform noise",
                    "blocky noise", "colour mush", "noise on white", "noise on grey", "single pixel", "sparse specks")


def degenerate_image(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """One (side, side, 3) uint8 image of a kind in DEGENERATE_KINDS; none of them holds a shape."""
    shape = (side, side, 3)
    if kind in ("black", "white", "grey", "dark grey", "light grey"):
        value = {"black": 0, "white": 255, "grey": 128, "dark grey": 64, "light grey": 192}[kind]
        return np.full(shape, value, np.uint8)
    if kind == "flat colour":
        return np.full(shape, rng.integers(0, 256, 3), np.uint8)
    if kind == "uniform noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "blocky noise":  # blocks of 2 or 4 pixels, smaller than the smallest shape
        block = int(rng.choice([2, 4]))
        small = rng.integers(0, 256, (-(-side // block), -(-side // block), 3), dtype=np.uint8)
        return np.repeat(np.repeat(small, block, axis=0), block, axis=1)[:side, :side]
    if kind == "colour mush":   # a smooth field: a 4x4 random image upsampled
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR))
    if kind == "noise on white":
        return np.clip(255 + rng.normal(0, 60, shape), 0, 255).astype(np.uint8)
    if kind == "noise on grey":
        return np.clip(rng.uniform(40, 220) + rng.normal(0, 50, shape), 0, 255).astype(np.uint8)
    if kind == "single pixel":
        image = np.full(shape, 255, np.uint8)
        image[tuple(rng.integers(0, side, 2))] = list(PALETTE.values())[int(rng.integers(len(PALETTE)))]
        return image
    if kind == "sparse specks":  # white with a tenth of the pixels set to random colours
        image = np.full(shape, 255, np.uint8)
        hit = rng.random((side, side)) < 0.1
        image[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
        return image
    raise ValueError(f"unknown degenerate image {kind!r}; one of {', '.join(DEGENERATE_KINDS)}")


def degenerate_images(rng: np.random.Generator, sides=(32, 64), per_kind: int = 1) -> list[tuple[str, np.ndarray]]:
    """(name, image) of every degenerate kind at every side, per_kind of each (random kinds differ each time)."""
    return [(f"{kind} {side}px", degenerate_image(kind, side, rng))
            for kind in DEGENERATE_KINDS for side in sides for _ in range(per_kind)]


def box_blur(image: Image.Image, radius: int) -> np.ndarray:
    """The image blurred by a (2 radius + 1)^2 box, as RGB uint8."""
    return np.asarray(image.convert("RGB").filter(ImageFilter.BoxBlur(radius)))


def half_cut(obj: ShapeObject, width: int, height: int, side: str) -> np.ndarray:
    """A render of obj with the half of the image on `side` (left, right, top, bottom) of its centre painted white."""
    image = np.asarray(render([obj], width, height)).copy()
    cx, cy = int(round(obj.x * width)), int(round(obj.y * height))
    region = {"left": (slice(None), slice(0, cx)), "right": (slice(None), slice(cx, None)),
              "top": (slice(0, cy), slice(None)), "bottom": (slice(cy, None), slice(None))}[side]
    image[region] = 255
    return image


def cut_by_border(obj: ShapeObject, width: int, height: int) -> np.ndarray:
    """An image of obj's size whose left border runs through obj's centre: the left half of the shape is outside.

    obj.y places it vertically; obj.x is ignored (the shape is drawn at the centre of a twice-as-wide render whose
    right half is kept)."""
    wide = np.asarray(render([ShapeObject(obj.kind, obj.color, obj.size, 0.5, obj.y)], 2 * width, height))
    return np.ascontiguousarray(wide[:, width:])

"""Training images for the shapes classifier (evaluation/classifier.py): renders degraded the way generated images
are, and degenerate images that hold no object.

Generated images differ from renders in ways the renderer never produces: soft, blended rims; ragged outlines;
colours a little off the palette and textured; an off-white background; noise, specks, stray strokes and blur; a
bite missing from an object.
Each training image takes some of these at random strengths (Degradation), so the classifier learns the attributes
through them. One image in Degradation.p_empty holds no object: a uniform colour (black, white, grey or any), uniform
or blocky noise, smooth colour mush, or white with a few specks; the classifier's object head learns to tell these
apart.

    images, labels = training_batch(rng, 128)   # (128, 32, 32, 3) uint8; labels: {"object", "kind", ...} (128,)
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from data.synthetic import PALETTE, SceneSpec, ShapeObject, sample_scene, shape_mask
from evaluation.classifier import HEADS, INPUT_SIDE

IGNORE = -100  # label of an attribute head on an image without object (cross-entropy skips it)


@dataclass(frozen=True)
class Degradation:
    """Probabilities and strengths of what is done to a render (each drawn per image, uniformly up to the max)."""

    p_empty: float = 0.15              # share of images without an object
    object_weights: tuple[float, ...] = (0.6, 0.25, 0.15)  # P(1, 2, 3 objects) of the other images
    min_gap: float = 0.06              # as the held-out scenes: shapes never touch
    main_margin: float = 1.3           # the largest object's area is at least this times the second's (else redrawn)
    color_jitter: float = 30.0         # max per-channel shift of an object's fill colour (levels of 255)
    background_jitter: float = 15.0    # max darkening of the white background, per channel
    p_soft: float = 0.6                # draw at 4x and average down (else the renderer's own 1x pixels): soft rims
    p_ragged: float = 0.5              # of soft images: flip up to max_ragged of the outline band (ragged outlines)
    max_ragged: float = 0.4
    p_bite: float = 0.25               # paint a random box of up to max_bite of the object's extent white
    max_bite: float = 0.3
    p_texture: float = 0.5             # per-pixel noise of up to max_texture levels on the objects only
    max_texture: float = 30.0
    p_fragments: float = 0.3           # 1-3 stray bars (1-2 x 1-5 pixels) of an object's colour near it
    p_blur: float = 0.3                # gaussian blur up to max_blur pixels
    max_blur: float = 0.9
    p_noise: float = 0.5               # gaussian noise up to max_noise levels
    max_noise: float = 25.0
    p_speckle: float = 0.3             # up to max_speckle of the pixels set to random colours
    max_speckle: float = 0.04


def main_object(objects: list[ShapeObject], masks: list[np.ndarray], margin: float) -> int | None:
    """Index of the object with the most pixels, or None when the runner-up comes within `margin` of it."""
    areas = sorted(((int(m.sum()), i) for i, m in enumerate(masks)), reverse=True)
    if len(areas) > 1 and areas[0][0] < margin * areas[1][0]:
        return None
    return areas[0][1]


def _ragged(mask: np.ndarray, share: float, width: int, rng: np.random.Generator) -> np.ndarray:
    """The mask with about `share` of its outline band (`width` pixels either side of the border) flipped in clumps
    of about `width` pixels, as a generated rim wanders."""
    outline = ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_erosion(mask, iterations=width)
    seeds = outline & (rng.random(mask.shape) < share / width ** 2)
    flip = ndimage.binary_dilation(seeds, iterations=max(1, width // 2)) & outline
    return mask ^ flip


def _bite(mask: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The mask with a random box of up to `share` of its height and width (placed on the object) removed."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return mask
    h = max(1, int((rows.max() - rows.min() + 1) * share * rng.random()))
    w = max(1, int((cols.max() - cols.min() + 1) * share * rng.random()))
    k = int(rng.integers(len(rows)))
    out = mask.copy()
    out[max(0, rows[k] - h // 2):rows[k] + (h + 1) // 2, max(0, cols[k] - w // 2):cols[k] + (w + 1) // 2] = False
    return out


def _fragments(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray, scale: int, rng: np.random.Generator):
    """Paint 1-3 small bars of `color` within a few pixels of the object (mask, at `scale` x), as stray strokes."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return
    size = canvas.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(rows)))
        h, w = int(rng.integers(1, 3)) * scale, int(rng.integers(1, 6)) * scale
        if rng.random() < 0.5:
            h, w = w, h
        y = int(np.clip(rows[k] + rng.integers(-3, 4) * scale, 0, size - h))
        x = int(np.clip(cols[k] + rng.integers(-3, 4) * scale, 0, size - w))
        canvas[y:y + h, x:x + w] = color


def degraded_render(rng: np.random.Generator, d: Degradation) -> tuple[np.ndarray, dict[str, int]]:
    """One (32, 32, 3) uint8 image of 1-3 shapes, degraded; labels of its largest object (head -> value index)."""
    side = INPUT_SIDE
    soft = rng.random() < d.p_soft
    scale = 4 if soft else 1  # soft: drawn at 4x (outlines changed at sub-pixel scale), then averaged down
    spec = SceneSpec(max_objects=len(d.object_weights), object_weights=d.object_weights, min_gap=d.min_gap)
    while True:
        objects = sample_scene(rng, spec)
        masks = [shape_mask(o, side, side) for o in objects]
        main = main_object(objects, masks, d.main_margin)
        if main is not None:
            break
    background = 255.0 - rng.random(3) * d.background_jitter
    canvas = np.broadcast_to(background, (side * scale, side * scale, 3)).copy()  # (S, S, 3) float
    for obj in objects:
        mask = shape_mask(obj, side * scale, side * scale)
        if soft:  # the renderer's 1x pixels cover a shape's outline: grow it by 1/4 to 1/2 pixel to match
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
            if rng.random() < d.p_ragged:
                mask = _ragged(mask, d.max_ragged * rng.random(), scale // 2, rng)
        if rng.random() < d.p_bite:
            mask = _bite(mask, d.max_bite, rng)
        color = np.asarray(PALETTE[obj.color], dtype=np.float64) + rng.uniform(-1, 1, 3) * d.color_jitter
        canvas[mask] = color
        if rng.random() < d.p_texture:
            canvas[mask] += rng.normal(0, d.max_texture * rng.random(), (int(mask.sum()), 3))
        if rng.random() < d.p_fragments:
            _fragments(canvas, mask, color, scale, rng)
    image = canvas.reshape(side, scale, side, scale, 3).mean(axis=(1, 3))  # (32, 32, 3): rims blend when soft
    image = _noise_and_blur(image, rng, d)
    obj = objects[main]
    labels = {"object": 1, "kind": HEADS["kind"].index(obj.kind), "color": HEADS["color"].index(obj.color),
              "size": HEADS["size"].index(obj.size), "position": HEADS["position"].index(obj.position)}
    return image, labels


def _noise_and_blur(image: np.ndarray, rng: np.random.Generator, d: Degradation) -> np.ndarray:
    """Blur, gaussian noise and speckle (each with its probability) of a float image; uint8 out."""
    if rng.random() < d.p_blur:
        image = ndimage.gaussian_filter(image, sigma=(d.max_blur * rng.random(),) * 2 + (0,), mode="nearest")
    if rng.random() < d.p_noise:
        image = image + rng.normal(0, d.max_noise * rng.random(), image.shape)
    if rng.random() < d.p_speckle:
        hit = rng.random(image.shape[:2]) < d.max_speckle * rng.random()
        image[hit] = rng.uniform(0, 255, (int(hit.sum()), 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def empty_image(rng: np.random.Generator, d: Degradation) -> np.ndarray:
    """One (32, 32, 3) uint8 image without an object: a flat colour, noise, colour mush, or white with specks."""
    side = INPUT_SIDE
    kind = int(rng.integers(5))
    if kind == 0:    # flat: black, white, a grey, or any colour
        value = rng.choice([0.0, 255.0, rng.uniform(0, 255)]) if rng.random() < 0.6 else None
        colour = np.full(3, value) if value is not None else rng.uniform(0, 255, 3)
        image = np.broadcast_to(colour, (side, side, 3)).astype(np.float64)
    elif kind == 1:  # uniform noise, per pixel or in blocks of 2, 4 or 8
        block = int(rng.choice([1, 2, 4, 8]))
        small = rng.uniform(0, 255, (side // block, side // block, 3))
        image = np.repeat(np.repeat(small, block, axis=0), block, axis=1)
    elif kind == 2:  # smooth mush: a 4x4 random field upsampled (bilinear)
        small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR), dtype=np.float64)
    elif kind == 3:  # white with up to 4 specks of a palette colour (1-3 pixels each)
        image = np.full((side, side, 3), 255.0)
        for _ in range(int(rng.integers(1, 5))):
            y, x = rng.integers(0, side - 1, 2)
            h, w = rng.integers(1, 3, 2)
            image[y:y + h, x:x + w] = list(PALETTE.values())[int(rng.integers(len(PALETTE)))]
    else:            # a background colour field with noise on it
        image = np.broadcast_to(rng.uniform(0, 255, 3), (side, side, 3)) + rng.normal(0, 30, (side, side, 3))
    return _noise_and_blur(image, rng, d)


def training_batch(rng: np.random.Generator, n: int, d: Degradation = Degradation()
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(n, 32, 32, 3) uint8 images and labels {"object": (n,) 0/1, head: (n,) value index or IGNORE}."""
    images, labels = [], {name: [] for name in ("object", *HEADS)}
    for _ in range(n):
        if rng.random() < d.p_empty:
            image, label = empty_image(rng, d), {"object": 0, **{name: IGNORE for name in HEADS}}
        else:
            image, label = degraded_render(rng, d)
        images.append(image)
        for name, value in label.items():
            labels[name].append(value)
    return np.stack(images), {name: np.asarray(v, dtype=np.int64) for name, v in labels.items()}

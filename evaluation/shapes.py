"""Read the synthetic shapes back from an image, and score images against the captions they were made from.

The reader is exact image analysis of what data/synthetic.py renders, not a learned model:

1. every pixel is read as white blended with one palette colour (the colour whose blend line passes nearest);
   pixels that are more colour than white are that colour's foreground (blend_labels);
2. foreground pixels form 8-connected components; a component holding several colours in force (two touching
   shapes) is split by colour; components smaller than MIN_AREA_SHARE of the smallest shape are noise;
3. each object is matched against every (kind, size) template, rasterised by the renderer itself
   (data.synthetic.shape_mask) at sub-pixel centres around the object's centroid; the template with the
   largest intersection-over-union gives kind, size and centre, the centre gives the position cell.

On rendered images the best template fits exactly (IoU 1), so the reader is right except for centres within a
fraction of a pixel of a cell border (tests/test_evaluation.py measures >= 98% per attribute). On generated
images, IoU says how shape-like a blob is.
"""

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from data.synthetic import KINDS, PALETTE, POSITIONS, SIZES, ShapeObject, shape_mask
from evaluation.paired import binomial_stderr

ATTRIBUTES = ("kind", "color", "size", "position")
COLOR_NAMES = tuple(PALETTE)
REFERENCE = np.array([(255, 255, 255), *PALETTE.values()], dtype=np.float32)  # (9, 3): white, then the palette
MIN_AREA_SHARE = 0.6          # smallest object = this share of the smallest shape's rendered area
MAJOR_COLOR_SHARE = 0.3       # a colour with this share of a component (and the minimum area) is its own object
OFF_PALETTE_DISTANCE = 80.0   # foreground pixels farther than this from every palette colour are "off-palette"
MIN_SIDE = 32                 # smaller images are refused (see README: below 32 px noise clumps read as small shapes)
# What counts as an object (docs/RESULTS.md, "The evaluator", shows the distributions these were chosen from):
MIN_IOU = 0.4                 # template fit
MIN_PALETTE_SHARE = 0.5       # share of the object's pixels near its palette colour
PALETTE_PIXEL_DISTANCE = 60.0  # RGB distance within which a pixel counts as the object's palette colour
MIN_BACKGROUND_SHARE = 0.3    # share of the image nearest white: objects are read on a white background only


@dataclass(frozen=True)
class Detection:
    """One shape read from an image."""

    kind: str
    color: str
    size: str
    x: float          # centre, fraction of the image width
    y: float          # centre, fraction of the image height
    area: int         # pixels of the object
    iou: float        # overlap with the best-fitting template (1.0: drawn exactly like the renderer)
    palette_share: float = 1.0  # share of its pixels within PALETTE_PIXEL_DISTANCE of its colour (renders: 1.0)
    background: float = 1.0     # share of the image's pixels nearest white (renders: >= 0.6)

    @property
    def acceptable(self) -> bool:
        """Shape-like and palette-coloured enough, on a white enough image, to count as an object."""
        return (self.iou >= MIN_IOU and self.palette_share >= MIN_PALETTE_SHARE
                and self.background >= MIN_BACKGROUND_SHARE)

    @property
    def position(self) -> str:
        return POSITIONS[min(int(self.y * 3), 2)][min(int(self.x * 3), 2)]

    def attributes(self) -> dict[str, str]:
        return {"kind": self.kind, "color": self.color, "size": self.size, "position": self.position}


def nearest_reference(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W): 0 = white, 1..8 = palette index + 1; distance (H, W) to that colour) of an RGB uint8 image."""
    pixels = image.reshape(-1, 3).astype(np.float32)  # (HW, 3)
    dist = np.linalg.norm(pixels[:, None, :] - REFERENCE[None], axis=2)  # (HW, 9)
    labels = dist.argmin(axis=1)
    return labels.reshape(image.shape[:2]), dist[np.arange(len(labels)), labels].reshape(image.shape[:2])


def blend_labels(image: np.ndarray) -> np.ndarray:
    """Labels (H, W) of an RGB uint8 image: 0 = background, 1..8 = palette index + 1.

    Each pixel is taken as white blended with one palette colour, p = white + a (colour - white): the colour whose
    blend line passes nearest the pixel, with a fitted in [0, 1]. The pixel is that colour's foreground when a >= 1/2
    (more colour than white). A soft or blurred rim is thereby read as its own colour, where the nearest palette
    colour would often be another one (a red-white blend is nearer pink than red). Pixels far from every line
    (grey, black, noise) take the colour whose line passes nearest, at a = 1: their nearest palette colour.
    """
    pixels = image.reshape(-1, 3).astype(np.float32) - REFERENCE[0]  # (HW, 3), relative to white
    lines = REFERENCE[1:] - REFERENCE[0]                                # (8, 3)
    amount = np.clip(pixels @ lines.T / (lines * lines).sum(axis=1), 0.0, 1.0)  # (HW, 8)
    residual = np.linalg.norm(pixels[:, None, :] - amount[..., None] * lines[None], axis=2)  # (HW, 8)
    best = residual.argmin(axis=1)
    labels = np.where(amount[np.arange(len(best)), best] >= 0.5, best + 1, 0)
    return labels.reshape(image.shape[:2])


def _template_area_min(width: int, height: int) -> int:
    smallest = min(SIZES, key=SIZES.get)
    return min(int(shape_mask(ShapeObject(k, COLOR_NAMES[0], smallest, 0.5, 0.5), width, height).sum())
               for k in KINDS)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def fit_template(mask: np.ndarray, color: str) -> tuple[str, str, float, float, float]:
    """(kind, size, x, y, IoU) of the template that best overlaps a (H, W) bool object mask.

    Centres stay where the renderer puts them (sample_scene: the whole shape inside the image), so an object cut
    by the image border fits no template exactly. Coarse pass: every kind and size at the centroid and half-pixel
    offsets. Fine pass, for the three best: a
    quarter-pixel grid around their best centre, then a 1/16-pixel scan along each axis; the centre returned on
    each axis is the middle of the run of offsets that tie at the best IoU (the interval of centres that draw
    this mask, when it fits exactly).
    """
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5  # centroid in the renderer's pixel coordinates

    def inside(size, v, side) -> float:
        """Centre fraction kept where the renderer puts centres: the whole shape inside the image."""
        half = SIZES[size] / 2
        return min(max(v / side, half), 1.0 - half)

    def score(kind, size, x, y) -> float:
        fx, fy = inside(size, x, width), inside(size, y, height)
        return _iou(mask, shape_mask(ShapeObject(kind, color, size, fx, fy), width, height))

    coarse = []
    for kind, size in itertools.product(KINDS, SIZES):
        best = max((score(kind, size, cx + dx, cy + dy), cx + dx, cy + dy)
                   for dx, dy in itertools.product((-0.5, 0.0, 0.5), repeat=2))
        coarse.append((best[0], kind, size, best[1], best[2]))
    coarse.sort(reverse=True)
    results = []
    for _, kind, size, x, y in coarse[:3]:
        quarter = [0.25 * i for i in range(-3, 4)]
        _, x, y = max((score(kind, size, x + dx, y + dy), x + dx, y + dy)
                      for dx, dy in itertools.product(quarter, repeat=2))
        fine = [i / 16 for i in range(-16, 17)]
        along_x = [score(kind, size, x + d, y) for d in fine]
        x += _middle_of_best(along_x, fine)
        along_y = [score(kind, size, x, y + d) for d in fine]
        y += _middle_of_best(along_y, fine)
        results.append((max(along_y), kind, size, x, y))
    iou, kind, size, x, y = max(results)
    return kind, size, inside(size, x, width), inside(size, y, height), iou


def _middle_of_best(scores: list[float], offsets: list[float]) -> float:
    """The middle offset of the contiguous run of best scores that holds the first best one."""
    top = max(scores)
    first = scores.index(top)
    last = first
    while last + 1 < len(scores) and scores[last + 1] >= top - 1e-9:
        last += 1
    return (offsets[first] + offsets[last]) / 2


def read_shapes(image: np.ndarray) -> list[Detection]:
    """The acceptable shapes in an RGB uint8 image (H, W, 3), largest first (candidates that fail MIN_IOU or
    MIN_PALETTE_SHARE are left out: an image of nothing but those holds no object)."""
    return [d for d in read_candidates(image) if d.acceptable]


def read_candidates(image: np.ndarray) -> list[Detection]:
    """Every candidate object of an RGB uint8 image (H, W, 3) with its template fit and palette share, largest
    first, acceptable or not."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"read_shapes takes an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"the shapes reader needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (its smallest "
                         f"shape spans 0.2 of the shorter side), got {width}x{height}")
    labels = blend_labels(image)
    background = float(np.mean(labels == 0))
    min_area = max(1, int(MIN_AREA_SHARE * _template_area_min(width, height)))
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3), dtype=int))
    objects = []
    for index in range(1, count + 1):
        component = components == index
        if np.count_nonzero(component) < min_area:
            continue
        colors = np.bincount(labels[component], minlength=len(REFERENCE))[1:]  # (8,) pixels per palette colour
        major = [c for c in np.argsort(-colors)
                 if colors[c] >= min_area and colors[c] >= MAJOR_COLOR_SHARE * colors.sum()]
        if len(major) <= 1:  # one shape: the whole component, blended rim pixels included
            parts = [(int(major[0]) if major else int(colors.argmax()), component)]
        else:  # touching shapes of different colours
            parts = [(int(c), component & (labels == c + 1)) for c in major]
        for color_index, mask in parts:
            color = COLOR_NAMES[color_index]
            kind, size, x, y, iou = fit_template(mask, color)
            distance = np.linalg.norm(image[mask].astype(np.float32) - np.float32(PALETTE[color]), axis=1)  # (n,)
            share = float(np.mean(distance <= PALETTE_PIXEL_DISTANCE))
            objects.append(Detection(kind, color, size, x, y, int(np.count_nonzero(mask)), iou, share, background))
    return sorted(objects, key=lambda d: -d.area)


# ----------------------------------------------------------------------------------------------------------
# Scoring against captions


@dataclass
class ImageScore:
    """How one image matches the objects of its caption."""

    expected: list[dict]               # attributes of each captioned object
    detected: list[Detection]          # acceptable objects only
    matched: list[dict]                # per captioned object: {attribute: bool}, all False when unmatched
    rejected: list[Detection] = field(default_factory=list)  # candidates that failed the acceptance thresholds

    @property
    def no_object(self) -> bool:
        """Nothing in the image counts as an object: every attribute of every captioned object is wrong."""
        return not self.detected

    @property
    def count_ok(self) -> bool:
        return len(self.detected) == len(self.expected)

    @property
    def all_ok(self) -> bool:
        return self.count_ok and all(all(m.values()) for m in self.matched)

    def errors(self) -> int:
        """Wrong attributes plus the count difference: how far the image is from its caption."""
        wrong = sum(not ok for m in self.matched for ok in m.values())
        return wrong + abs(len(self.detected) - len(self.expected))


def score_image(expected: list[ShapeObject], detected: list[Detection]) -> ImageScore:
    """Pair captioned objects with the acceptable detections (an optimal assignment minimising wrong attributes);
    detections that are not acceptable are kept as `rejected` and match nothing."""
    rejected = [d for d in detected if not d.acceptable]
    detected = [d for d in detected if d.acceptable]
    want = [{"kind": o.kind, "color": o.color, "size": o.size, "position": o.position} for o in expected]
    got = [d.attributes() for d in detected]
    matched = [{a: False for a in ATTRIBUTES} for _ in want]
    if want and got:
        cost = np.array([[sum(w[a] != g[a] for a in ATTRIBUTES) - 0.01 * d.iou for g, d in zip(got, detected)]
                         for w in want])
        for i, j in zip(*linear_sum_assignment(cost)):
            matched[i] = {a: want[i][a] == got[j][a] for a in ATTRIBUTES}
    return ImageScore(want, detected, matched, rejected)


def summarise(scores: list[ImageScore]) -> dict:
    """Accuracy per attribute (over captioned objects), count and whole-image accuracy and the share of images
    with no acceptable object (over images), in %."""
    objects = [m for s in scores for m in s.matched]
    if not scores:
        raise ValueError("no images to summarise")
    out = {"images": len(scores), "objects": len(objects)}
    for attr in ATTRIBUTES:
        out[attr] = 100.0 * sum(m[attr] for m in objects) / max(len(objects), 1)
    out["count"] = 100.0 * sum(s.count_ok for s in scores) / len(scores)
    out["all"] = 100.0 * sum(s.all_ok for s in scores) / len(scores)
    out["no_object"] = 100.0 * sum(s.no_object for s in scores) / len(scores)
    # The sampling error of each accuracy (binomial, over the objects or images it counts): how far apart two
    # readings on different scenes must be to differ; on the same scenes compare pairwise (evaluation/paired.py).
    out["stderr"] = {attr: binomial_stderr(sum(m[attr] for m in objects), len(objects)) for attr in ATTRIBUTES}
    out["stderr"]["count"] = binomial_stderr(sum(s.count_ok for s in scores), len(scores))
    out["stderr"]["all"] = binomial_stderr(sum(s.all_ok for s in scores), len(scores))
    out["mean_iou"] = float(np.mean([d.iou for s in scores for d in s.detected])) if any(
        s.detected for s in scores) else 0.0
    # Kind accuracy of the captioned objects of each kind: which outline the model fails to draw.
    pairs = [(w["kind"], m["kind"]) for s in scores for w, m in zip(s.expected, s.matched)]
    out["kind_by_kind"] = {k: 100.0 * sum(ok for kk, ok in pairs if kk == k) / n
                           for k in KINDS if (n := sum(kk == k for kk, _ in pairs))}
    return out


# ----------------------------------------------------------------------------------------------------------
# Features for a Frechet distance between generated and real images


def feature_names() -> list[str]:
    cells = [f"foreground_cell{r}{c}" for r in range(3) for c in range(3)]
    return [f"share_{name}" for name in ("white", *COLOR_NAMES, "off_palette")] + cells + [
        "foreground_off_palette", "foreground_distance", "mean_iou", "objects"]


def shape_features(image: np.ndarray, detections: list[Detection] | None = None) -> np.ndarray:
    """A 23-dim description of an RGB uint8 image (float64), every entry of order 1:

    the share of pixels nearest white, each palette colour, or off-palette (10); the foreground share of each
    3x3 cell (9); the off-palette share of the foreground, the mean distance of foreground pixels to their palette
    colour / 50 (smudges, noise), the mean template IoU (shape fidelity) and the object count / 3.

    Few, dense features keep the sampling noise of a Frechet distance over a few hundred images small (two real
    sets of 200: ~0.01) against what it should see (Gaussian noise of std 40: ~1.5; a 3x3 blur: ~1.0).
    """
    height, width = image.shape[:2]
    labels, dist = nearest_reference(image)
    classes = np.where((labels > 0) & (dist > OFF_PALETTE_DISTANCE), len(REFERENCE), labels)  # 9 = off-palette
    feats = list(np.bincount(classes.ravel(), minlength=len(REFERENCE) + 1) / classes.size)
    foreground = labels > 0
    for r, c in itertools.product(range(3), repeat=2):
        feats.append(foreground[r * height // 3:(r + 1) * height // 3, c * width // 3:(c + 1) * width // 3].mean())
    detections = read_shapes(image) if detections is None else detections
    feats += [
        float(np.mean(classes[foreground] == len(REFERENCE))) if foreground.any() else 0.0,
        float(dist[foreground].mean()) / 50.0 if foreground.any() else 0.0,
        float(np.mean([d.iou for d in detections])) if detections else 0.0,
        len(detections) / 3.0,
    ]
    return np.asarray(feats, dtype=np.float64)

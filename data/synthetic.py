"""Synthetic shapes data set for CPU experiments: images, exact captions and edge maps."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("circle", "square", "triangle", "diamond", "cross")
PALETTE = {                         # name -> RGB; all readable on the white background
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 200, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
}
SIZES = {"small": 0.2, "medium": 0.3, "large": 0.4}  # shape extent as a fraction of the shorter image side
POSITIONS = (                       # 3x3 grid, row-major from the top left
    ("top left", "top center", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom center", "bottom right"),
)
MIN_GAP = 0.02                      # extra clearance between circumscribed circles, in fractions of the shorter side


@dataclass(frozen=True)
class ShapeObject:
    """One coloured shape; x, y are centre fractions of the image width and height."""

    kind: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self):
        """Reject unknown names and out-of-range centres."""
        checks = (("kind", self.kind, KINDS), ("color", self.color, PALETTE), ("size", self.size, SIZES))
        for field, value, valid in checks:
            if value not in valid:
                raise UserError(f"ShapeObject.{field}={value!r} is not one of {list(valid)}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise UserError(f"ShapeObject centre ({self.x}, {self.y}) must lie in [0, 1] x [0, 1]")

    @property
    def position(self) -> str:
        """Named cell of the 3x3 grid that holds the centre."""
        return POSITIONS[min(int(self.y * 3), 2)][min(int(self.x * 3), 2)]

    def to_dict(self) -> dict:
        """Fields plus the derived position, as stored in metadata.jsonl."""
        return {**asdict(self), "position": self.position}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeObject:
        """Inverse of to_dict (the derived position is ignored)."""
        return cls(d["kind"], d["color"], d["size"], float(d["x"]), float(d["y"]))


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn: how many shapes, how far apart, how far from the 3x3 grid's cell borders."""

    max_objects: int = 3                           # 1..max_objects shapes per image
    object_weights: tuple[float, ...] | None = None  # P(k shapes) ~ object_weights[k - 1]; None: uniform
    min_gap: float = MIN_GAP                       # clearance between circumscribed circles (fraction of short side)
    cell_margin: float = 0.0                       # centres at least this far from the cell borders 1/3, 2/3

    def __post_init__(self):
        if self.max_objects < 1:
            raise UserError(f"max_objects must be >= 1, got {self.max_objects}")
        if self.object_weights is not None:
            w = np.asarray(self.object_weights, dtype=np.float64)
            if len(w) != self.max_objects or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise UserError(f"object_weights needs {self.max_objects} non-negative weights (for 1.."
                                 f"{self.max_objects} shapes) with a positive sum, got {list(self.object_weights)}")
        if not 0 <= self.min_gap < 0.5 or not 0 <= self.cell_margin < 1 / 6:
            raise UserError(f"min_gap must be in [0, 0.5) and cell_margin in [0, 1/6), got {self.min_gap} and "
                             f"{self.cell_margin}")


def conflicting_caption(text: str, kind_shifts: Sequence[int], cell_shifts: Sequence[int]) -> str:
    """The caption with every object's kind and place replaced by another (object j: the kind kind_shifts[j] % 4 + 1
    places further in KINDS, the cell cell_shifts[j] % 8 + 1 cells further in the 3x3 grid); colours and sizes stay."""
    objects = parse_caption(text)
    cells = [p for row in POSITIONS for p in row]
    out = []
    for obj, dk, dc in zip(objects, kind_shifts, cell_shifts):
        kind = KINDS[(KINDS.index(obj.kind) + 1 + dk % (len(KINDS) - 1)) % len(KINDS)]
        cell = cells[(cells.index(obj.position) + 1 + dc % (len(cells) - 1)) % len(cells)]
        row, col = next((r, c) for r, names in enumerate(POSITIONS) for c, name in enumerate(names) if name == cell)
        out.append(ShapeObject(kind, obj.color, obj.size, (col + 0.5) / 3, (row + 0.5) / 3))
    return caption(out)


def colour_only_caption(text: str) -> str:
    """'a red shape' for each object of the caption: its colours alone."""
    parts = [f"a {obj.color} shape" for obj in parse_caption(text)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _clear_of_borders(v: float, margin: float) -> bool:
    return margin == 0 or min(abs(v - 1 / 3), abs(v - 2 / 3)) >= margin


def sample_scene(rng: np.random.Generator, spec: SceneSpec = SceneSpec()) -> list[ShapeObject]:
    """Draw shapes whose circumscribed circles keep spec.min_gap apart at any aspect ratio.

    The number of shapes is uniform in 1..max_objects, or k with probability object_weights[k - 1] / sum; a shape
    that finds no free place in 50 tries is left out.
    """
    if spec.object_weights is None:
        count = int(rng.integers(1, spec.max_objects + 1))
    else:
        weights = np.asarray(spec.object_weights, dtype=np.float64)
        count = int(rng.choice(spec.max_objects, p=weights / weights.sum())) + 1
    objects: list[ShapeObject] = []
    for _ in range(count):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        half = SIZES[size] / 2  # the extent is relative to the shorter side, so this margin fits any aspect
        for _attempt in range(50):
            x, y = (round(float(v), 3) for v in rng.uniform(half, 1 - half, size=2))
            if not (_clear_of_borders(x, spec.cell_margin) and _clear_of_borders(y, spec.cell_margin)):
                continue
            # Distances in fractions lower-bound pixel distances over the shorter side, so this is aspect-safe.
            if all(math.hypot(x - o.x, y - o.y) >= half + SIZES[o.size] / 2 + spec.min_gap for o in objects):
                objects.append(ShapeObject(kind, color, size, x, y))
                break
    return objects


def caption(objects: Sequence[ShapeObject]) -> str:
    """Exact English description, e.g. 'a large red circle at the top left and a small blue square at the center'."""
    if not objects:
        raise ValueError("caption needs at least one object")
    parts = [f"a {o.size} {o.color} {o.kind} at the {o.position}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_CAPTION_PART = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(KINDS)}) at the "
    rf"({'|'.join(name for row in POSITIONS for name in row)})")


class CaptionError(UserError):
    """A caption that is not a shapes caption."""


def parse_caption(text: str) -> list[ShapeObject]:
    """Inverse of caption(): the objects a caption names, each centred in its named cell of the 3x3 grid.

    Raises CaptionError naming the first part that is not "a SIZE COLOUR KIND at the POSITION".
    """
    parts = re.split(r", | and ", text.strip().lower())
    objects = []
    for part in parts:
        match = _CAPTION_PART.fullmatch(part.strip())
        if match is None:
            raise CaptionError(f"{part!r} in caption {text!r} is not 'a SIZE COLOUR KIND at the POSITION' "
                             f"(sizes {', '.join(SIZES)}; colours {', '.join(PALETTE)}; kinds {', '.join(KINDS)})")
        size, color, kind, position = match.groups()
        row, col = next((r, c) for r, names in enumerate(POSITIONS) for c, name in enumerate(names)
                        if name == position)
        objects.append(ShapeObject(kind, color, size, (col + 0.5) / 3, (row + 0.5) / 3))
    return objects


def _outline(obj: ShapeObject, width: int, height: int) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels, or None for a circle (drawn as an ellipse)."""
    cx, cy, r = obj.x * width, obj.y * height, SIZES[obj.size] * min(width, height) / 2
    if obj.kind == "circle":
        return None
    if obj.kind == "square":
        unit = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif obj.kind == "triangle":  # equilateral, pointing up, circumradius r
        unit = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif obj.kind == "diamond":
        unit = [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]
    else:  # cross: a plus sign with arms a third of the radius wide on each side
        a, b = 1 / 3, 0.9
        unit = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    return [(cx + r * u, cy + r * v) for u, v in unit]


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, width: int, height: int, fill, outline=None, line: int = 1):
    """Draw one shape filled with `fill` and, if given, outlined inwards with `outline` of `line` pixels."""
    points = _outline(obj, width, height)
    if points is None:
        cx, cy, r = obj.x * width, obj.y * height, SIZES[obj.size] * min(width, height) / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=line)
    else:
        draw.polygon(points, fill=fill, outline=outline, width=line)


def shape_mask(obj: ShapeObject, width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of the pixels render() paints for obj (the same rasterisation)."""
    image = Image.new("1", (width, height), 0)
    _draw(ImageDraw.Draw(image), obj, width, height, fill=1)
    return np.asarray(image, dtype=bool)


def render(objects: Sequence[ShapeObject], width: int, height: int, background=(255, 255, 255)) -> Image.Image:
    """RGB image of the shapes, painted in list order (no anti-aliasing, so colours are exact)."""
    image = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, width, height, fill=PALETTE[obj.color])
    return image


def edge_width(width: int, height: int) -> int:
    """Outline width in pixels used by render_edges."""
    return max(1, min(width, height) // 64)


def render_edges(objects: Sequence[ShapeObject], width: int, height: int) -> Image.Image:
    """RGB edge map: white visible shape boundaries on black, drawn just inside each shape."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in objects:  # the black fill erases edges that a later shape would hide in render()
        _draw(draw, obj, width, height, fill=(0, 0, 0), outline=(255, 255, 255), line=edge_width(width, height))
    return image


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for image `index`; equal to SeedSequence(seed).spawn(n)[index] for any n > index."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _save_png(image: Image.Image, path: Path):
    """Write a PNG through a temporary name so an interrupted run leaves no truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def scene_at(seed: int, index: int, sizes: Sequence[tuple[int, int]], scene: SceneSpec = SceneSpec()
             ) -> tuple[int, int, list[ShapeObject]]:
    """(width, height, objects) of image `index` of the data set with this seed: what write_dataset draws."""
    rng = _image_rng(seed, index)
    width, height = sizes[int(rng.integers(len(sizes)))]
    return width, height, sample_scene(rng, scene)


def write_dataset(
    out_dir,
    num_images: int,
    seed: int,
    sizes: Sequence[tuple[int, int]] = ((256, 256),),
    scene: SceneSpec = SceneSpec(),
    progress: bool = True,
) -> list[dict]:
    """Write images, captions, edge maps and metadata.jsonl to out_dir; returns the metadata records."""
    if num_images < 1:
        raise UserError(f"num_images must be >= 1, got {num_images}")
    sizes = [(int(w), int(h)) for w, h in sizes]
    if not sizes or any(w < 1 or h < 1 for w, h in sizes):
        raise UserError(f"sizes must be a non-empty list of positive (width, height) pairs, got {sizes}")
    out = Path(out_dir)
    (out / "edges").mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(num_images), desc="synthetic data", disable=not progress):
        width, height, objects = scene_at(seed, i, sizes, scene)
        text = caption(objects)
        name = f"{i:06d}"
        _save_png(render(objects, width, height), out / f"{name}.png")
        _save_png(render_edges(objects, width, height), out / "edges" / f"{name}.png")
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        records.append({
            "image": f"{name}.png", "caption": text, "edge": f"edges/{name}.png",
            "width": width, "height": height, "objects": [o.to_dict() for o in objects],
        })
    tmp = out / "metadata.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, out / "metadata.jsonl")
    logger.info("wrote %d synthetic images (seed %d) to %s", num_images, seed, out)
    return records


def read_metadata(folder) -> list[dict]:
    """Records of metadata.jsonl in folder, one dict per image."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create the data set with tools/make_synthetic_data.py")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

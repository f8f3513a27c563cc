"""Does the control map decide the image, or the caption? Held-out single-object scenes in three sets:

  agree     the caption names the map's object (kind, colour, size, place): control and caption agree;
  conflict  the caption names ANOTHER kind at ANOTHER place (same colour and size) than the map draws: an image that
            follows the map cannot be the result of following the caption, and the reverse;
  colour    the caption names only the colour ("a red shape"): kind and place can come from the map alone.

Per set: edge F1 of the image against the map, and for the image's main object (the largest acceptable one read by
evaluation/shapes.py): "follows the map" (in the map's position cell with the map's kind), its two halves (map's
place, map's kind), "follows the caption" (the caption's place and kind; conflict set only), and the caption's colour.
An image with no acceptable object follows nothing.
"""

from dataclasses import dataclass

import numpy as np

from data.synthetic import KINDS, POSITIONS, ShapeObject, caption, render, render_edges, scene_at
from evaluation.shapes import Detection, read_shapes

CONTROL_SETS = ("agree", "conflict", "colour")


@dataclass(frozen=True)
class ControlItem:
    """One controlled generation to score."""

    caption: str                          # the prompt
    mapped: ShapeObject                   # the object the edge map draws (its kind, place, size)
    captioned: ShapeObject | None         # the object the caption names; None when it names only the colour
    edges: np.ndarray                     # (H, W, 3) uint8 edge map of `mapped`
    real: np.ndarray                      # (H, W, 3) uint8 render of `mapped` in the caption's colour


def _cell_centre(position: str) -> tuple[float, float]:
    row, col = next((r, c) for r, names in enumerate(POSITIONS) for c, name in enumerate(names) if name == position)
    return (col + 0.5) / 3, (row + 0.5) / 3


def control_items(seed: int, count: int, which: str, width: int = 32, height: int = 32,
                  scene=None) -> list[ControlItem]:
    """`count` items of set `which` from the single-object scenes of the held-out data seed `seed` (scenes with
    several objects are skipped); the conflicting kind and place are drawn from a generator seeded by the scene."""
    if which not in CONTROL_SETS:
        raise ValueError(f"unknown control set {which!r}; valid: {', '.join(CONTROL_SETS)}")
    items, index = [], 0
    while len(items) < count:
        w, h, objects = scene_at(seed, index, [(width, height)], *([scene] if scene is not None else []))
        index += 1
        if len(objects) != 1:
            continue
        mapped = objects[0]
        captioned: ShapeObject | None = mapped
        if which == "conflict":
            rng = np.random.default_rng([seed, index, 17])
            kind = str(rng.choice([k for k in KINDS if k != mapped.kind]))
            cells = [p for row in POSITIONS for p in row if p != mapped.position]
            x, y = _cell_centre(str(rng.choice(cells)))
            captioned = ShapeObject(kind, mapped.color, mapped.size, x, y)
        text = f"a {mapped.color} shape" if which == "colour" else caption([captioned])
        if which == "colour":
            captioned = None
        items.append(ControlItem(text, mapped, captioned, np.asarray(render_edges([mapped], w, h)),
                                 np.asarray(render([mapped], w, h))))
    return items


def main_object(image: np.ndarray) -> Detection | None:
    """The largest acceptable object the shapes reader finds, or None."""
    found = read_shapes(image)
    return max(found, key=lambda d: d.area) if found else None


def score_control(images: list[np.ndarray], items: list[ControlItem]) -> dict[str, float]:
    """Percentages over the items: follows the map (place and kind), map place, map kind, follows the caption (place
    and kind, where the caption names them), caption colour, no object."""
    counts = dict.fromkeys(("follows_map", "map_position", "map_kind", "follows_caption", "caption_color",
                            "no_object"), 0)
    for image, item in zip(images, items):
        found = main_object(image)
        if found is None:
            counts["no_object"] += 1
            continue
        place, kind = found.position == item.mapped.position, found.kind == item.mapped.kind
        counts["map_position"] += place
        counts["map_kind"] += kind
        counts["follows_map"] += place and kind
        counts["caption_color"] += found.color == item.mapped.color
        if item.captioned is not None:
            counts["follows_caption"] += (found.position == item.captioned.position
                                          and found.kind == item.captioned.kind)
    out = {k: 100.0 * v / len(items) for k, v in counts.items()}
    if all(item.captioned is None for item in items):
        out.pop("follows_caption")
    return out

"""The control evaluation (evaluation/control.py) tells control from caption following, and the caption rewriting
the ControlNet trainer uses (data/synthetic.py) keeps colours and sizes while moving every kind and place."""

from dataclasses import replace

import numpy as np
import pytest

from data.synthetic import (
    KINDS,
    SIZES,
    ShapeObject,
    colour_only_caption,
    conflicting_caption,
    parse_caption,
    render,
)
from evaluation.control import CONTROL_SETS, control_items, score_control

SEED = 1_000_003


@pytest.mark.parametrize("which", CONTROL_SETS)
def test_the_sets_differ_only_in_what_the_caption_says(which):
    items = control_items(SEED, 30, which)
    assert len(items) == 30
    for item in items:
        assert item.edges.shape == (32, 32, 3) and item.edges.max() == 255
        if which == "agree":
            assert parse_caption(item.caption)[0].kind == item.mapped.kind
            assert parse_caption(item.caption)[0].position == item.mapped.position
        elif which == "conflict":
            named = parse_caption(item.caption)[0]
            assert named.kind != item.mapped.kind and named.position != item.mapped.position
            assert named.color == item.mapped.color and named.size == item.mapped.size
        else:
            assert item.caption == f"a {item.mapped.color} shape" and item.captioned is None
    assert [i.mapped for i in items] == [i.mapped for i in control_items(SEED, 30, "agree")]  # the same scenes


def inside(obj: ShapeObject) -> ShapeObject:
    """The object moved within its cell until it lies wholly inside the image (a caption names only the cell)."""
    half = SIZES[obj.size] / 2 + 0.02
    return replace(obj, x=min(max(obj.x, half), 1 - half), y=min(max(obj.y, half), 1 - half))


def test_a_model_that_follows_the_map_and_one_that_follows_the_caption():
    """Ideal images of each behaviour score 100 on their own measure and 0 on the other."""
    items = control_items(SEED, 40, "conflict")
    follows_map = [np.asarray(render([it.mapped], 32, 32)) for it in items]
    follows_caption = [np.asarray(render([inside(it.captioned)], 32, 32)) for it in items]
    blank = [np.full((32, 32, 3), 255, np.uint8) for _ in items]
    a, b, c = (score_control(images, items) for images in (follows_map, follows_caption, blank))
    assert a["follows_map"] >= 95 and a["follows_caption"] == 0 and a["caption_color"] >= 95
    assert b["follows_caption"] >= 95 and b["follows_map"] == 0 and b["map_position"] == 0
    assert c["no_object"] == 100 and c["follows_map"] == c["follows_caption"] == c["caption_color"] == 0


def test_colour_only_scores_have_no_caption_column():
    items = control_items(SEED, 10, "colour")
    scores = score_control([np.asarray(render([it.mapped], 32, 32)) for it in items], items)
    assert "follows_caption" not in scores and scores["follows_map"] >= 90


def test_conflicting_captions_move_every_kind_and_place_and_keep_the_rest():
    text = "a large red circle at the center, a small blue square at the top left and a medium pink cross at the " \
           "bottom right"
    before = parse_caption(text)
    for shifts in range(12):
        after = parse_caption(conflicting_caption(text, [shifts, shifts + 1, 2 * shifts], [shifts, 3, shifts + 5]))
        for a, b in zip(before, after):
            assert a.kind != b.kind and a.position != b.position and (a.color, a.size) == (b.color, b.size)
    seen = {parse_caption(conflicting_caption("a large red circle at the center", [k], [0]))[0].kind
            for k in range(4)}
    assert seen == set(KINDS) - {"circle"}  # every other kind is reachable
    assert colour_only_caption(text) == "a red shape, a blue shape and a pink shape"

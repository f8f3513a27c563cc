"""Edge agreement (evaluation/edges.py): exact properties, and the ceiling on real renders of the shapes set."""

import numpy as np
import pytest

from data.synthetic import SceneSpec, render, render_edges, scene_at
from evaluation.edges import edge_agreement, edge_scores


def square_outline(offset=0, size=32):
    m = np.zeros((size, size), bool)
    a, b = 8 + offset, 23 + offset
    m[a:b + 1, a] = m[a:b + 1, b] = m[a, a:b + 1] = m[b, a:b + 1] = True
    return m


def test_edge_scores_properties():
    ref = square_outline()
    assert edge_scores(ref, ref) == (1.0, 1.0, 1.0)
    assert edge_scores(square_outline(1), ref, tolerance=1)[2] == 1.0  # one pixel off: within tolerance
    assert edge_scores(square_outline(1), ref, tolerance=0)[2] < 0.5
    far = np.zeros_like(ref)
    far[0, 0] = True
    assert edge_scores(far, ref) == (0.0, 0.0, 0.0)
    assert edge_scores(np.zeros_like(ref), ref) == (1.0, 0.0, 0.0)  # nothing drawn: nothing wrong, nothing found
    assert edge_scores(np.zeros_like(ref), np.zeros_like(ref)) == (1.0, 1.0, 1.0)
    half = ref.copy()
    half[:, 16:] = False
    p, r, f1 = edge_scores(half, ref)
    assert p == 1.0 and 0.4 < r < 0.6 and f1 == pytest.approx(2 * r / (1 + r))
    with pytest.raises(ValueError, match="different sizes"):
        edge_scores(ref, ref[:8])


def test_real_renders_agree_with_their_edge_maps():
    """The ceiling a perfect generator reaches: Canny edges of the real images against the maps they were drawn
    with (what ControlNet training and evaluation use)."""
    scenes = [scene_at(7, i, [(32, 32)], SceneSpec(max_objects=3, object_weights=(2, 1, 1))) for i in range(100)]
    real = [np.asarray(render(o, w, h)) for w, h, o in scenes]
    maps = [np.asarray(render_edges(o, w, h)) for w, h, o in scenes]
    assert edge_agreement(real, maps)["edge_f1"] > 98
    shuffled = edge_agreement(real, maps[1:] + maps[:1])["edge_f1"]  # another scene's map
    assert shuffled < 50

"""Synthetic shapes data: determinism, captions, edge maps, sizes and the CLI's input checks."""

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import (
    KINDS,
    PALETTE,
    SIZES,
    SceneSpec,
    ShapeObject,
    caption,
    edge_width,
    read_metadata,
    render,
    render_edges,
    sample_scene,
    write_dataset,
)

SMALL = ((64, 64),)


def load_cli():
    """Import tools/make_synthetic_data.py by path (tools/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_data.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_bytes(folder: Path) -> dict:
    """Relative path -> bytes for every file under folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation of a 2-D mask by a (2k+1)^2 square."""
    padded = np.pad(mask, k)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def colour_change(image: Image.Image) -> np.ndarray:
    """Pixels whose colour differs from a 4-neighbour."""
    a = np.asarray(image.convert("RGB")).astype(np.int16)
    change = np.zeros(a.shape[:2], dtype=bool)
    vertical = (a[1:] != a[:-1]).any(-1)
    horizontal = (a[:, 1:] != a[:, :-1]).any(-1)
    change[1:] |= vertical
    change[:-1] |= vertical
    change[:, 1:] |= horizontal
    change[:, :-1] |= horizontal
    return change


def assert_edges_on_boundary(objects, width, height):
    """Edge pixels lie within the outline width of a colour change, and nearly every colour change has an edge."""
    edges = np.asarray(render_edges(objects, width, height))
    assert edges.shape == (height, width, 3)
    assert set(np.unique(edges)) <= {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    white = edges[..., 0] == 255
    change = colour_change(render(objects, width, height))
    assert white.sum() > 0 and change.sum() > 0
    tol = edge_width(width, height) + 1
    assert not (white & ~dilate(change, tol)).any(), "edge pixels away from any shape boundary"
    covered = (change & dilate(white, tol)).sum() / change.sum()
    assert covered > 0.98, f"only {covered:.3f} of the shape boundary has an edge nearby"


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset(tmp_path / name, 4, seed=seed, sizes=((64, 64), (48, 80)), progress=False)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert len(a) == 4 * 3 + 1 and a == b
    assert a.keys() == c.keys() and a["metadata.jsonl"] != c["metadata.jsonl"]
    assert sum(a[k] != c[k] for k in a) >= 10


def test_image_i_does_not_depend_on_how_many_are_written(tmp_path):
    write_dataset(tmp_path / "three", 3, seed=7, sizes=SMALL, progress=False)
    write_dataset(tmp_path / "five", 5, seed=7, sizes=SMALL, progress=False)
    three, five = tree_bytes(tmp_path / "three"), tree_bytes(tmp_path / "five")
    for i in range(3):
        for key in (f"{i:06d}.png", f"{i:06d}.txt", f"edges/{i:06d}.png"):
            assert three[key] == five[key], key
    assert read_metadata(tmp_path / "five")[:3] == read_metadata(tmp_path / "three")


def test_captions_images_and_metadata_agree(tmp_path):
    records = write_dataset(tmp_path, 12, seed=3, sizes=((64, 64), (48, 80)), scene=SceneSpec(max_objects=3),
                            progress=False)
    assert read_metadata(tmp_path) == records and len(records) == 12
    assert not list(tmp_path.rglob("*.tmp"))
    for r in records:
        objects = [ShapeObject.from_dict(o) for o in r["objects"]]
        assert 1 <= len(objects) <= 3
        assert (tmp_path / r["image"].replace(".png", ".txt")).read_text(encoding="utf-8") == r["caption"]
        assert caption(objects) == r["caption"]
        image = Image.open(tmp_path / r["image"])
        assert image.mode == "RGB" and image.size == (r["width"], r["height"])
        assert np.array_equal(np.asarray(image), np.asarray(render(objects, r["width"], r["height"])))
        for o, d in zip(objects, r["objects"]):
            assert f"{o.color} {o.kind}" in r["caption"] and f"at the {d['position']}" in r["caption"]
            assert d["position"] == o.position
            centre = image.getpixel((int(o.x * r["width"]), int(o.y * r["height"])))
            assert centre == PALETTE[o.color], "each shape is visible at its centre (no overlaps)"


def test_caption_wording_and_positions():
    objects = [ShapeObject("circle", "red", "large", 0.1, 0.1), ShapeObject("square", "blue", "small", 0.5, 0.5)]
    assert caption(objects) == "a large red circle at the top left and a small blue square at the center"
    three = objects + [ShapeObject("cross", "green", "medium", 0.9, 0.5)]
    assert caption(three) == ("a large red circle at the top left, a small blue square at the center "
                              "and a medium green cross at the middle right")
    assert ShapeObject("circle", "red", "small", 0.5, 0.99).position == "bottom center"
    assert ShapeObject("circle", "red", "small", 1.0, 0.0).position == "top right"
    assert ShapeObject("circle", "red", "small", 0.0, 0.5).position == "middle left"
    with pytest.raises(ValueError, match="kind"):
        ShapeObject("blob", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="color"):
        ShapeObject("circle", "teal", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ShapeObject("circle", "red", "small", 1.5, 0.5)


def test_sample_scene_counts_bounds_and_no_overlap():
    seen_counts, seen_kinds = set(), set()
    for seed in range(200):
        objects = sample_scene(np.random.default_rng(seed), SceneSpec(max_objects=3))
        seen_counts.add(len(objects))
        seen_kinds.update(o.kind for o in objects)
        for i, o in enumerate(objects):
            half = SIZES[o.size] / 2
            assert half <= o.x <= 1 - half and half <= o.y <= 1 - half
            for p in objects[:i]:
                assert math.hypot(o.x - p.x, o.y - p.y) >= half + SIZES[p.size] / 2
    assert seen_counts == {1, 2, 3} and seen_kinds == set(KINDS)
    assert all(len(sample_scene(np.random.default_rng(s), SceneSpec(max_objects=1))) == 1 for s in range(20))


def test_edge_maps_trace_shape_boundaries(tmp_path):
    records = write_dataset(tmp_path, 6, seed=5, sizes=((64, 64), (128, 96), (256, 256)), progress=False)
    for r in records:
        edge = Image.open(tmp_path / r["edge"])
        assert edge.mode == "RGB" and edge.size == (r["width"], r["height"])
        assert_edges_on_boundary([ShapeObject.from_dict(o) for o in r["objects"]], r["width"], r["height"])
    overlapping = [ShapeObject("circle", "red", "large", 0.4, 0.5), ShapeObject("square", "blue", "medium", 0.65, 0.5)]
    assert_edges_on_boundary(overlapping, 128, 128)  # the circle's arc hidden under the square has no edge
    assert edge_width(256, 256) == 4 and edge_width(48, 80) == 1


def test_sizes_are_honoured(tmp_path):
    sizes = ((64, 64), (48, 80), (96, 32))
    records = write_dataset(tmp_path, 15, seed=0, sizes=sizes, progress=False)
    assert {(r["width"], r["height"]) for r in records} == set(sizes)
    for r in records:
        assert Image.open(tmp_path / r["image"]).size == (r["width"], r["height"])
        assert Image.open(tmp_path / r["edge"]).size == (r["width"], r["height"])
    with pytest.raises(ValueError, match="sizes"):
        write_dataset(tmp_path / "bad", 1, seed=0, sizes=((0, 64),), progress=False)


def test_read_metadata_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_synthetic_data"):
        read_metadata(tmp_path)


def test_cli_writes_data_set(tmp_path, caplog):
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO):
        load_cli().main([str(out), "--num", "3", "--seed", "2", "--sizes", "64x64,48x80", "--no-progress"])
    assert len(read_metadata(out)) == 3 and len(list((out / "edges").glob("*.png"))) == 3
    assert "writing 3 images" in caplog.text and "wrote 3 synthetic images" in caplog.text


@pytest.mark.parametrize("sizes, message", [
    ("abc", "is not WIDTHxHEIGHT"),
    ("64x64,abc", "is not WIDTHxHEIGHT"),
    ("0x10", "multiples of 8"),
    ("250x256", "multiples of 8"),
])
def test_cli_rejects_bad_sizes(tmp_path, capsys, sizes, message):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main([str(tmp_path / "data"), "--num", "1", "--sizes", sizes])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_cli_rejects_bad_num_and_non_empty_out_dir(tmp_path, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path / "data"), "--num", "0"])
    assert exit_info.value.code != 0 and "--num must be >= 1" in capsys.readouterr().err
    out = tmp_path / "data"
    cli.main([str(out), "--num", "4", "--sizes", "64x64", "--no-progress"])
    (out / "notes.md").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(out), "--num", "2", "--sizes", "64x64"])
    assert exit_info.value.code != 0 and "--overwrite" in capsys.readouterr().err
    cli.main([str(out), "--num", "2", "--sizes", "64x64", "--overwrite", "--no-progress"])
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    assert len(read_metadata(out)) == 2 and (out / "notes.md").read_text() == "keep me"

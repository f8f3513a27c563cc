"""The shapes reader cannot be fooled: degenerate images hold no object and score every attribute wrong, damaged
renders are read as what they show, and bad image files are read right or refused (tools/evaluate.py folder)."""

import itertools
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from data.synthetic import KINDS, PALETTE, ShapeObject, caption, parse_caption, render
from evaluation.degenerate import DEGENERATE_KINDS, box_blur, cut_by_border, degenerate_image, half_cut
from evaluation.images import read_rgb
from evaluation.report import evaluate_images
from evaluation.shapes import MIN_SIDE, read_candidates, read_shapes, score_image, summarise
from tests.conftest import load_script

evaluate = load_script("tools/evaluate.py")
CENTRE_CIRCLE = "a large red circle at the center"


@pytest.mark.parametrize("kind", DEGENERATE_KINDS)
def test_degenerate_images_hold_no_object(kind):
    """Black, white, greys, flat colours, noise of several kinds at several sizes, a single pixel: no object, so
    every attribute of the caption's object is wrong and the image counts as 'no object'."""
    rng = np.random.default_rng(0)
    for side, _ in itertools.product((32, 48, 64, 100), range(4)):
        image = degenerate_image(kind, side, rng)
        assert read_shapes(image) == [], (kind, side)
        score = score_image(parse_caption(CENTRE_CIRCLE), read_candidates(image))
        assert score.no_object and not any(score.matched[0].values()) and not score.count_ok


def test_issue_eight_black_images_score_zero():
    """The issue's case: black (and grey) images captioned 'a large red circle at the center' used to score kind,
    size, position and count 100%; now every column is 0 and 'no object' is 100."""
    images = [np.zeros((32, 32, 3), np.uint8)] * 4 + [np.full((64, 64, 3), 128, np.uint8)] * 4
    results, scores = evaluate_images(images, [CENTRE_CIRCLE] * 8, progress=False)
    single = results["groups"]["single"]
    assert {k: single[k] for k in ("kind", "color", "size", "position", "count", "all")} == dict.fromkeys(
        ("kind", "color", "size", "position", "count", "all"), 0.0)
    assert single["no_object"] == 100.0 and all(s.rejected for s in scores)  # the rejected blob is kept for the report


def test_uniform_noise_of_any_size_holds_no_object():
    rng = np.random.default_rng(1)
    for height, width in ((32, 32), (33, 47), (64, 64), (96, 128), (200, 150)):
        assert read_shapes(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) == []


def test_single_pixel_and_specks_hold_no_object():
    for color in PALETTE.values():
        image = np.full((32, 32, 3), 255, np.uint8)
        image[16, 16] = color
        assert read_candidates(image) == []  # below the minimum area: not even a candidate
        image[16:18, 16:18] = color          # a 2x2 speck: still smaller than any shape
        assert read_shapes(image) == []


def test_box_blurred_renders_at_64px_read_right():
    """Box blur of radius 2 (a 5x5 box) leaves a large shape at 64 px recognisable: every kind in every colour, at
    several places, is read right. Its rim blends the colour with white, which is read as that colour
    (blend_labels): the nearest palette colour of a red-white blend would be pink. (A blurred medium cross can merge
    its arms into a diamond, depending on where it falls on the pixel grid.)"""
    for kind, color, (x, y) in itertools.product(KINDS, PALETTE, ((0.3, 0.6), (0.5, 0.5), (0.72, 0.25))):
        obj = ShapeObject(kind, color, "large", x, y)
        score = score_image([obj], read_shapes(box_blur(render([obj], 64, 64), radius=2)))
        assert score.all_ok, (kind, color, (x, y), score.detected, score.rejected)


def test_box_blurred_small_shapes_at_32px_are_not_their_kind():
    """The same blur on a 32 px image turns a small shape (4-6 pixels across) into a blob: never read as the kind
    it was drawn as, except the circle, which a blurred circle still is."""
    for kind, color in itertools.product(KINDS, PALETTE):
        obj = ShapeObject(kind, color, "small", 0.5, 0.5)
        score = score_image([obj], read_shapes(box_blur(render([obj], 32, 32), radius=2)))
        if kind != "circle":
            assert not score.matched[0]["kind"], (kind, color, score.detected)


@pytest.mark.parametrize("side", [32, 64])
def test_half_cropped_objects_score_wrong(side):
    """A medium or large shape with half of it painted white (left, right, top or bottom of its centre), or cut by
    the image border through its centre, is never read as the shape it was drawn as (all attributes right)."""
    for kind, color, size in itertools.product(KINDS, ("red", "green", "blue"), ("medium", "large")):
        obj = ShapeObject(kind, color, size, 0.5, 0.5)
        for cut in ("left", "right", "top", "bottom"):
            score = score_image([obj], read_shapes(half_cut(obj, side, side, cut)))
            assert not score.all_ok, (kind, size, cut, score.detected)
        at_border = ShapeObject(kind, color, size, 0.5 * 0.2, 0.5)  # the caption's object: left of the image
        score = score_image([at_border], read_shapes(cut_by_border(obj, side, side)))
        assert not score.all_ok, (kind, size, "border", score.detected)


def test_off_palette_shapes_are_not_read():
    """A black or grey circle is shaped right but holds no palette colour: not read (it used to read as brown)."""
    obj = ShapeObject("circle", "brown", "large", 0.5, 0.5)
    for grey in ((0, 0, 0), (64, 64, 64), (128, 128, 128)):
        image = np.asarray(render([obj], 32, 32)).copy()
        image[np.all(image == PALETTE["brown"], axis=2)] = grey
        (candidate,) = read_candidates(image)
        assert candidate.iou == 1.0 and candidate.palette_share == 0.0 and read_shapes(image) == []


def test_small_images_are_refused():
    for side in (4, 8, 16, MIN_SIDE - 1):
        with pytest.raises(ValueError, match=f"at least {MIN_SIDE}x{MIN_SIDE}"):
            read_shapes(np.full((side, side, 3), 255, np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Bad image files through tools/evaluate.py folder


def png16(pixels: np.ndarray) -> bytes:
    """A PNG of 16 bits per channel written by hand (Pillow writes no 16-bit RGB): pixels (H, W, C) uint16, C = 1
    (greyscale) or 3 (RGB)."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


SCENES = [[ShapeObject("square", "blue", "large", 0.5, 0.5)], [ShapeObject("triangle", "green", "medium", 0.2, 0.8)],
          [ShapeObject("cross", "orange", "large", 0.75, 0.3)], [ShapeObject("circle", "pink", "small", 0.5, 0.2)]]


def write_captioned(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": name, "caption": caption(objects)}) for name, objects in images]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run_folder(tmp_path, folder):
    out = tmp_path / "out"
    code = evaluate.main(["folder", str(folder), "--out", str(out), "--no-progress"])
    record = json.loads(next(out.iterdir()).joinpath("results.json").read_text()) if code == 0 else None
    return code, record


def test_folder_mixing_sizes_reads_each_at_its_size(tmp_path, caplog):
    sizes = [(32, 32), (64, 48), (48, 96), (32, 32)]
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, (objects, (w, h)) in enumerate(zip(SCENES, sizes)):
        render(objects, w, h).save(folder / f"{i}.png")
    write_captioned(folder, [(f"{i}.png", s) for i, s in enumerate(SCENES)])
    code, record = run_folder(tmp_path, folder)
    assert code == 0 and record["groups"]["all"]["all"] == 100.0
    assert record["images_found"]["sizes"] == {"32x32": 2, "64x48": 1, "48x96": 1}
    assert "mix sizes (32x32: 2, 64x48: 1, 48x96: 1): each is read at its own size" in caplog.text


def test_alpha_channel_is_composited_over_white(tmp_path, caplog):
    """Renders whose background is transparent black (RGB 0, alpha 0): read over white they are right; their RGB
    alone would be black, an image of no object."""
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, objects in enumerate(SCENES):
        rgb = np.asarray(render(objects, 32, 32))
        alpha = np.where(np.all(rgb == 255, axis=2), 0, 255).astype(np.uint8)
        rgba = np.dstack([np.where(alpha[..., None] == 0, 0, rgb), alpha]).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    write_captioned(folder, [(f"{i}.png", s) for i, s in enumerate(SCENES)])
    assert read_shapes(np.asarray(Image.open(folder / "0.png").convert("RGB"))) == []  # what dropping alpha gives
    code, record = run_folder(tmp_path, folder)
    assert code == 0 and record["groups"]["all"]["all"] == 100.0
    assert record["images_found"]["conversions"] == {"transparent pixels: composited over white": 4}
    assert "transparent pixels: composited over white: 4 images (0.png, 1.png, 2.png, 3.png)" in caplog.text


def test_16_bit_pngs_are_read_at_8_bits(tmp_path, caplog):
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, objects in enumerate(SCENES):
        (folder / f"{i}.png").write_bytes(png16(np.asarray(render(objects, 32, 32)).astype(np.uint16) * 257))
    write_captioned(folder, [(f"{i}.png", s) for i, s in enumerate(SCENES)])
    code, record = run_folder(tmp_path, folder)
    assert code == 0 and record["groups"]["all"]["all"] == 100.0
    assert "16 bits per channel: read at 8 bits: 4 images" in caplog.text
    grey = tmp_path / "grey.png"
    grey.write_bytes(png16(np.full((32, 32, 1), 40000, np.uint16)))
    loaded = read_rgb(grey)
    assert loaded.note == "16-bit greyscale: scaled to 8 bits"
    assert loaded.pixels.shape == (32, 32, 3) and (loaded.pixels == round(40000 / 257)).all()  # Pillow alone: 255


@pytest.mark.parametrize("side", [4, 8, 16])
def test_images_smaller_than_the_minimum_are_refused(tmp_path, caplog, side):
    folder = tmp_path / "gen"
    folder.mkdir()
    info = PngInfo()
    info.add_text("prompt", CENTRE_CIRCLE)
    Image.new("RGB", (side, side), "white").save(folder / "tiny.png", pnginfo=info)
    assert evaluate.main(["folder", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"tiny.png is {side}x{side} pixels: the shapes reader needs at least {MIN_SIDE}x{MIN_SIDE}" in caplog.text
    assert not (tmp_path / "out").exists()


def test_unreadable_and_float_images_are_refused(tmp_path):
    from evaluation.images import ImageInputError

    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="cannot read image"):
        read_rgb(tmp_path / "junk.png")
    Image.fromarray(np.zeros((32, 32), np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(ImageInputError, match="floating-point pixels"):
        read_rgb(tmp_path / "float.tiff")


def test_no_object_column_in_the_report(tmp_path):
    """results.md has the 'no object' column; worst.png's text says why an image was read as empty."""
    from evaluation.report import markdown_table

    images = [np.asarray(render(SCENES[0], 32, 32)), np.zeros((32, 32, 3), np.uint8)]
    results, scores = evaluate_images(images, [caption(SCENES[0])] * 2, progress=False)
    assert results["groups"]["single"]["no_object"] == 50.0
    table = markdown_table(results)
    assert "| count | all | no object | mean IoU |" in table
    assert "| single | 2 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 1.000 |" in table
    assert summarise(scores)["no_object"] == 50.0

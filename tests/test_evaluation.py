"""The evaluator: the shapes reader on held-out real images, scoring rules, Frechet distance, FID and CLIP score
against independent implementations (pytorch-fid, torchmetrics), and the tools/evaluate.py command line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from data.synthetic import (
    KINDS,
    PALETTE,
    CaptionError,
    SceneSpec,
    ShapeObject,
    caption,
    parse_caption,
    render,
    sample_scene,
    scene_at,
)
from evaluation.config import EvaluationConfig
from evaluation.frechet import frechet_distance, frechet_distance_of
from evaluation.report import evaluate_images
from evaluation.shapes import read_shapes, score_image, shape_features, summarise
from tests.conftest import load_script
from tools.random_weights import write_fid_inception, write_tiny_clip

evaluate = load_script("tools/evaluate.py")


def held_out(num: int, width: int, height: int, seed: int = 1_000_003, spec: SceneSpec | None = None):
    spec = spec or EvaluationConfig().scene()
    scenes = [scene_at(seed, i, [(width, height)], spec)[2] for i in range(num)]
    return scenes, [np.asarray(render(objects, width, height)) for objects in scenes]


@pytest.mark.parametrize("width,height", [(32, 32), (64, 48)])
def test_reader_reads_held_out_real_images(width, height):
    """>= 98% per attribute and count on real renders of the held-out scenes (measured: 100%)."""
    scenes, images = held_out(250, width, height)
    summary = summarise([score_image(objects, read_shapes(image)) for objects, image in zip(scenes, images)])
    for key in ("kind", "color", "size", "position", "count"):
        assert summary[key] >= 98.0, (key, summary)
    assert summary["objects"] > 400


def test_reader_follows_each_attribute():
    """Changing one attribute of a drawn shape changes exactly that attribute of what is read."""
    base = ShapeObject("triangle", "blue", "medium", 0.2, 0.5)
    variants = {"kind": ShapeObject("cross", "blue", "medium", 0.2, 0.5),
                "color": ShapeObject("triangle", "orange", "medium", 0.2, 0.5),
                "size": ShapeObject("triangle", "blue", "large", 0.2, 0.5),
                "position": ShapeObject("triangle", "blue", "medium", 0.82, 0.16)}
    for changed, obj in variants.items():
        score = score_image([base], read_shapes(np.asarray(render([obj], 64, 64))))
        assert score.matched[0] == {a: a != changed for a in ("kind", "color", "size", "position")}, changed


def test_reader_counts_and_ignores_specks():
    image = np.asarray(render([ShapeObject("circle", "red", "large", 0.3, 0.3)], 64, 64)).copy()
    image[60, 60] = PALETTE["green"]  # one stray pixel is noise, not a shape
    assert [d.color for d in read_shapes(image)] == ["red"]
    two = np.asarray(render([ShapeObject("square", "pink", "small", 0.2, 0.8),
                             ShapeObject("diamond", "brown", "large", 0.7, 0.3)], 64, 64))
    score = score_image([ShapeObject("square", "pink", "small", 0.2, 0.8)], read_shapes(two))
    assert not score.count_ok and all(score.matched[0].values())
    blank = np.full((32, 32, 3), 255, np.uint8)
    missing = score_image([ShapeObject("square", "pink", "small", 0.2, 0.8)], read_shapes(blank))
    assert missing.errors() == 5 and not any(missing.matched[0].values())


def test_kind_by_kind_names_the_kind_that_fails():
    """Squares drawn as circles: square's accuracy is 0, the others' 100, and the per-kind accuracies weighted by
    their object counts give the overall kind accuracy."""
    wanted = [ShapeObject(kind, "red", "large", 0.5, 0.5) for kind in ("circle", "square", "square", "cross")]
    drawn = [ShapeObject("circle" if o.kind == "square" else o.kind, "red", "large", 0.5, 0.5) for o in wanted]
    scores = [score_image([w], read_shapes(np.asarray(render([d], 32, 32)))) for w, d in zip(wanted, drawn)]
    summary = summarise(scores)
    assert summary["kind_by_kind"] == {"circle": 100.0, "square": 0.0, "cross": 100.0}
    assert summary["kind"] == (100.0 * 1 + 0.0 * 2 + 100.0 * 1) / 4


def test_caption_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(100):
        objects = sample_scene(rng, SceneSpec(max_objects=3))
        parsed = parse_caption(caption(objects))
        assert [(o.kind, o.color, o.size, o.position) for o in parsed] == \
            [(o.kind, o.color, o.size, o.position) for o in objects]
    with pytest.raises(CaptionError, match="'a huge red circle at the center'.*SIZE COLOUR KIND"):
        parse_caption("a huge red circle at the center")


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(0.3, 1.5, size=(200, 12)) @ rng.normal(size=(12, 12))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_shape_features_ranks_corruption():
    _, real = held_out(120, 32, 32)
    _, other = held_out(120, 32, 32, seed=77)
    rng = np.random.default_rng(0)
    noisy = [np.clip(im.astype(int) + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8) for im in other]
    feats = [np.stack([shape_features(im) for im in images]) for images in (real, other, noisy)]
    same, corrupted = frechet_distance_of(feats[0], feats[1]), frechet_distance_of(feats[0], feats[2])
    assert corrupted > 5 * same


def test_fid_inception_matches_pytorch_fid(tmp_path, monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    from evaluation.inception import load_fid_inception

    path = write_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: torch.load(path))
    theirs = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = load_fid_inception(path)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(images)[0][:, :, 0, 0]
    torch.testing.assert_close(ours(images), expected, rtol=1e-4, atol=1e-5)


def test_fid_weights_errors(tmp_path):
    from evaluation.inception import WeightsError, load_fid_inception

    with pytest.raises(WeightsError, match="not found.*pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_fid_inception(tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="is not the FID Inception-v3.*missing keys"):
        load_fid_inception(tmp_path / "other.pth")


def test_clip_score_matches_torchmetrics(tmp_path):
    clip_module = pytest.importorskip("torchmetrics.multimodal.clip_score")
    from evaluation.clip_score import ClipScorer

    folder = write_tiny_clip(tmp_path / "clip")
    ours = ClipScorer(folder)

    class Unwrapped(torch.nn.Module):
        """transformers 5 returns output objects from get_*_features; torchmetrics expects tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    metric = clip_module.CLIPScore(model_name_or_path=lambda: (Unwrapped(ours.model), ours.processor))
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle at the center", "a small blue square", "the red circle"]
    uint8 = (images * 255).round().to(torch.uint8)
    expected = torch.stack([metric(uint8[i:i + 1], captions[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(ours(images, captions), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The command line


def write_folder(folder, scenes, images, how: str):
    folder.mkdir(parents=True)
    lines = []
    for i, (objects, image) in enumerate(zip(scenes, images)):
        info = PngInfo()
        if how == "png":
            info.add_text("prompt", caption(objects))
        Image.fromarray(image).save(folder / f"{i:04d}.png", pnginfo=info)
        if how == "txt":
            (folder / f"{i:04d}.txt").write_text(caption(objects))
        lines.append(json.dumps({"image": f"{i:04d}.png", "caption": caption(objects)}))
    if how == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how", ["png", "txt", "jsonl"])
def test_evaluate_folder_cli(tmp_path, how, capsys):
    scenes, images = held_out(12, 32, 32)
    write_folder(tmp_path / "gen", scenes, images, how)
    write_folder(tmp_path / "real", *held_out(12, 32, 32, seed=5), "png")
    code = evaluate.main(["folder", str(tmp_path / "gen"), "--real", str(tmp_path / "real"), "--out",
                          str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    run = next((tmp_path / "out").iterdir())
    record = json.loads((run / "results.json").read_text())
    assert record["groups"]["all"]["all"] == 100.0 and record["images"] == 12
    assert record["frechet_distance"] >= 0
    assert "| all | 12 |" in (run / "results.md").read_text()
    assert Image.open(run / "worst.png").size[0] > 100
    capsys.readouterr()
    assert evaluate.main(["table", str(run)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]  # a folder has no sampler, steps, guidance or time per image
    assert row.startswith("| gen | - | - | - | 100.0 |") and row.endswith("| - |") and "None" not in row
    assert "nan" not in row


def test_evaluate_folder_missing_and_extra_images(tmp_path, caplog):
    scenes, images = held_out(6, 32, 32)
    write_folder(tmp_path / "gen", scenes, images, "jsonl")
    (tmp_path / "gen" / "0002.png").unlink()
    Image.fromarray(images[0]).save(tmp_path / "gen" / "stray.png")
    out = str(tmp_path / "out")
    assert evaluate.main(["folder", str(tmp_path / "gen"), "--out", out, "--no-progress"]) == 2
    err = caplog.text
    assert "1 captioned images are missing (0002.png)" in err and "1 images have no caption (stray.png" in err
    assert "--partial" in err and not (tmp_path / "out").exists()
    assert evaluate.main(["folder", str(tmp_path / "gen"), "--out", out, "--partial", "--no-progress"]) == 0
    record = json.loads(next((tmp_path / "out").iterdir()).joinpath("results.json").read_text())
    assert record["images"] == 5


def test_evaluate_folder_bad_inputs(tmp_path, caplog):
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    assert evaluate.main(["folder", str(tmp_path / "none"), *out]) == 2
    assert "none': no such folder" in caplog.text
    (tmp_path / "file.png").write_bytes(b"")
    assert evaluate.main(["folder", str(tmp_path / "file.png"), *out]) == 2
    assert "is a file, not a folder of images" in caplog.text
    (tmp_path / "gen").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "gen" / "a.png")
    (tmp_path / "gen" / "a.txt").write_text("a photo of a cat")
    assert evaluate.main(["folder", str(tmp_path / "gen"), *out]) == 2
    assert "'a photo of a cat'" in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_fid_and_clip_cli(tmp_path):
    scenes, images = held_out(4, 32, 32)
    write_folder(tmp_path / "gen", scenes, images, "png")
    write_folder(tmp_path / "real", *held_out(4, 32, 32, seed=9), "png")
    weights = write_fid_inception(tmp_path / "inception.pth")
    assert evaluate.main(["fid", str(tmp_path / "gen"), str(tmp_path / "real"), "--weights", str(weights),
                          "--out", str(tmp_path / "fid")]) == 0
    assert json.loads(next((tmp_path / "fid").iterdir()).joinpath("results.json").read_text())["fid"] > 0
    clip = write_tiny_clip(tmp_path / "clip")
    assert evaluate.main(["clip", str(tmp_path / "gen"), "--clip", str(clip), "--out", str(tmp_path / "clip_out")]) == 0
    record = json.loads(next((tmp_path / "clip_out").iterdir()).joinpath("results.json").read_text())
    assert 0 <= record["clip_score"] <= 100 and len(record["per_image"]) == 4


def test_evaluate_images_groups():
    scenes, images = held_out(40, 32, 32)
    results, scores = evaluate_images(images, [caption(s) for s in scenes], real=images, progress=False)
    singles = sum(len(s) == 1 for s in scenes)
    assert results["groups"]["single"]["images"] == singles
    assert results["groups"]["multi"]["images"] == 40 - singles
    assert results["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert len(KINDS) == 5 and len(scores) == 40


def test_denoise_from_with_the_true_noise_returns_the_image():
    """DDIM fed the exact noise of x_t = alpha x0 + sigma eps (the ideal denoiser of one known image) lands on x0
    from any t0 and with any number of steps: a property of the update, not a formula of the code's own."""
    from diffusion.schedule import NoiseSchedule
    from evaluation.probe import denoise_from, timestep_grid

    schedule = NoiseSchedule.linear()
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn(3, 3, 8, 8)

    def ideal(x, t):
        alpha, sigma = schedule.alpha_sigma(t, x)
        return (x - alpha * x0) / sigma

    for t0, steps in ((50, 1), (400, 3), (999, 10)):
        assert torch.allclose(denoise_from(ideal, x0, schedule, t0, steps, noise), x0, atol=1e-4)
    assert timestep_grid(500, 4) == [500, 375, 250, 125, 0]


def test_prediction_grid_of_the_ideal_denoiser_shows_the_image_under_every_caption():
    """An ideal denoiser of the known render predicts that render from any t0 whatever the caption says, so every
    prediction tile is the render itself; the first tile of a row is the render noised to t0 (mostly noise)."""
    from data.synthetic import render
    from diffusion.schedule import NoiseSchedule
    from evaluation.probe import prediction_grid

    schedule = NoiseSchedule.linear()
    scenes = [[ShapeObject("square", "blue", "large", 0.5, 0.5)], [ShapeObject("cross", "red", "small", 0.2, 0.7)]]
    renders = [np.array(render(s, 16, 16)) for s in scenes]
    real = torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 127.5 - 1 for r in renders])
    asked = []

    def denoise_for(captions):
        asked.append(captions)
        x0 = real[len(asked) - 1]

        def ideal(x, t):
            alpha, sigma = schedule.alpha_sigma(t, x)
            return (x - alpha * x0) / sigma
        return ideal

    grid = prediction_grid(denoise_for, scenes, real, schedule, [300, 900], zoom=2)
    assert grid.shape == (2 * 2 * 18 * 2, 6 * 18 * 2, 3) and grid.dtype == np.uint8
    assert [c.split(" ")[3] for c in asked[0]] == list(KINDS)  # one caption per kind, the scene otherwise kept
    tiles = grid[::2, ::2].reshape(4, 18, 6, 18, 3)[:, 1:-1, :, 1:-1]  # (row, H, column, W, 3) without the frames
    for row in range(4):
        for column in range(1, 6):
            assert np.abs(tiles[row, :, column].astype(int) - renders[row // 2]).max() <= 1
        assert np.abs(tiles[row, :, 0].astype(int) - renders[row // 2]).mean() > 20  # the noised input


def test_swap_attribute_changes_only_that_attribute_and_spreads_the_values():
    from evaluation.probe import swap_attribute

    objects = [ShapeObject("circle", "red", "large", 0.5, 0.5)]
    kinds = [swap_attribute(objects, "kind", i)[0] for i in range(8)]
    assert all(o.kind != "circle" and (o.color, o.size, o.x, o.y) == ("red", "large", 0.5, 0.5) for o in kinds)
    assert {o.kind for o in kinds} == set(KINDS) - {"circle"}
    with pytest.raises(ValueError, match="swappable"):
        swap_attribute(objects, "position", 0)


def test_evaluate_probe_cli_on_the_shipped_teacher(tmp_path, caplog):
    """Denoised from t0 = 100 (the image nearly clean), the shipped teacher gives back what the image shows; with
    the kind word swapped it keeps the image's kind there. Bad arguments exit 2 and write nothing."""
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    code = evaluate.main(["probe", "--from", "100", "--steps", "4", "--swap", "kind", "--set",
                          "evaluation.num_images=40", *out])
    assert code == 0
    record = json.loads(next((tmp_path / "out").iterdir()).joinpath("results.json").read_text())
    (row,) = record["rows"]
    assert record["scenes"] >= 10 and row["t0"] == 100
    assert row["keeps_image"] >= 90 and row["follows_caption"] <= 10
    assert row["color"] >= 90 and row["position"] >= 90 and row["count"] >= 90
    with Image.open(next((tmp_path / "out").iterdir()) / "predictions.png") as grid:  # 2 scenes x 1 t0, 1 + 5 tiles
        assert grid.size == (6 * 34 * 4, 2 * 34 * 4)
    for bad, message in ((["--from", "0"], "must lie in 1..999"), (["--swap", "position"], "swappable"),
                         (["--steps", "0"], "--steps must be >= 1"),
                         (["--grid-scenes", "-1"], "--grid-scenes must be >= 0"),
                         (["--set", "sample.device=tpu9"], "unknown device"),
                         (["--set", "autoencoder.kind=sd-vae"], "needs a pixel-space model")):
        assert evaluate.main(["probe", *bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in caplog.text
    assert not (tmp_path / "bad").exists()


def test_evaluate_model_bad_sampling_settings_exit_2(tmp_path, caplog):
    """A sampling setting the pipeline refuses (here 0 steps) is a message and exit 2, not a traceback."""
    assert evaluate.main(["model", "--set", "sample.steps=0", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "steps must be an integer in 1..999" in caplog.text and not (tmp_path / "out").exists()

"""Training data pipeline: folders, aspect-ratio buckets, the batch sampler, feature extraction and its cache."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from data import (
    BucketBatchSampler,
    DataError,
    FeatureDataset,
    ImageCaptionFolder,
    assign_buckets,
    canny,
    collate,
    group_by_bucket,
    load_image,
)
from data.features import pil_to_tensor, sample_file
from data.synthetic import SceneSpec, ShapeObject, render, render_edges, sample_scene, write_dataset
from models.autoencoder import AutoencoderConfig, load_autoencoder
from models.text_encoder import TextEncoderConfig, load_text_encoder
from tools.extract_features import SampleError, extract, main

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((64, 64), (48, 80), (80, 48))  # (width, height): buckets 1.0, 1.67 and 0.6 at base size 64
BASE = 64


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """Eight synthetic images of three aspect ratios, with captions, edge maps and metadata.jsonl."""
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, 8, seed=0, sizes=SIZES, progress=False)
    return out


@pytest.fixture(scope="module")
def te_cfg(tiny_t5_path) -> TextEncoderConfig:
    return TextEncoderConfig(path=str(tiny_t5_path), max_tokens=16, dtype="fp32")


@pytest.fixture(scope="module")
def vae_cfg(tiny_vae_path) -> AutoencoderConfig:
    return AutoencoderConfig(path=str(tiny_vae_path))


PIXEL = AutoencoderConfig(kind="pixel")


@pytest.fixture(scope="module")
def vae_cache(tmp_path_factory, shapes_dir, te_cfg, vae_cfg) -> Path:
    """The shapes set extracted with the tiny T5 and tiny VAE, edge maps as control."""
    cache = tmp_path_factory.mktemp("cache")
    extract(shapes_dir, cache, te_cfg, vae_cfg, base_size=BASE, control="edge", batch_size=3, device="cpu",
            progress=False)
    return cache


def copy_dataset(src: Path, dst: Path, txt_only: bool = False) -> Path:
    """A private copy of a data set folder; txt_only drops metadata.jsonl so the .txt captions are used."""
    shutil.copytree(src, dst)
    if txt_only:
        (dst / "metadata.jsonl").unlink()
    return dst


def raw_pixels(path: Path) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] straight from the PNG (no resizing: the test sizes are bucket sizes)."""
    array = np.array(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def cache_tensors(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """key -> tensors of every indexed sample."""
    lines = [json.loads(line) for line in (cache / "index.jsonl").read_text().splitlines()]
    return {e["key"]: load_file(cache / e["file"]) for e in lines}


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation of a 2-D mask by a (2k+1)^2 square."""
    padded, (h, w) = np.pad(mask, k), mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


# ----------------------------------------------------------------------------------------------------------
# Folders


def test_folder_reads_jsonl_and_txt_alike(shapes_dir, tmp_path):
    jsonl = ImageCaptionFolder(shapes_dir)
    txt = ImageCaptionFolder(copy_dataset(shapes_dir, tmp_path / "txt", txt_only=True))
    assert (jsonl.mode, txt.mode) == ("jsonl", "txt")
    assert len(jsonl) == len(txt) == 8 and not jsonl.problems and not txt.problems
    assert [r.key for r in jsonl] == [f"{i:06d}" for i in range(8)] == [r.key for r in txt]
    for a, b in zip(jsonl, txt):
        assert a.caption == b.caption == (shapes_dir / f"{a.key}.txt").read_text()
        assert a.control.name == b.control.name == f"{a.key}.png" and b.control.is_file()
    assert load_image(jsonl[0].image).mode == "RGB"


def test_folder_reports_problems_without_raising(shapes_dir, tmp_path):
    txt_dir = copy_dataset(shapes_dir, tmp_path / "txt", txt_only=True)
    (txt_dir / "000003.txt").unlink()
    folder = ImageCaptionFolder(txt_dir)
    assert len(folder) == 7 and [p.key for p in folder.problems] == ["000003"]
    assert "000003.txt" in folder.problems[0].reason

    jsonl_dir = copy_dataset(shapes_dir, tmp_path / "jsonl")
    (jsonl_dir / "000005.png").unlink()
    with open(jsonl_dir / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    folder = ImageCaptionFolder(jsonl_dir)
    assert len(folder) == 7
    assert {p.key for p in folder.problems} == {"000005", "metadata.jsonl:9"}
    assert any("000005.png" in p.reason and "does not exist" in p.reason for p in folder.problems)

    (jsonl_dir / "000006.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="000006.png"):
        load_image(jsonl_dir / "000006.png")
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# Buckets and the batch sampler


def test_assign_buckets_uses_the_aspect_ratio_bins():
    keys = assign_buckets([(64, 64), (48, 80), (80, 48), (1000, 10), (10, 1000), (300, 310)], 256, 16)
    assert keys == ["1.0", "0.6", "1.67", "4.0", "0.25", "0.94"]
    assert group_by_bucket(keys[:3] + ["1.0"]) == {"1.0": [0, 3], "0.6": [1], "1.67": [2]}


def random_buckets(seed: int = 0) -> dict[str, list[int]]:
    """Bucket key -> indices for 60 random image sizes, some buckets small."""
    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in rng.integers(100, 400, size=(60, 2))]
    return group_by_bucket(assign_buckets(sizes, 256, 16))


def take(iterator, n: int) -> list[list[int]]:
    return [next(iterator) for _ in range(n)]


def test_sampler_batches_hold_one_bucket_and_cover_an_epoch():
    buckets = random_buckets()
    where = {i: k for k, v in buckets.items() for i in v}
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=7)
    expected = sum(len(v) // 3 for v in buckets.values())
    assert len(sampler) == expected
    it = iter(sampler)
    epoch0, epoch1 = take(it, expected), take(it, expected)
    for batch in epoch0 + epoch1:
        assert len(batch) == 3 and len({where[i] for i in batch}) == 1
    for epoch in (epoch0, epoch1):
        flat = [i for b in epoch for i in b]
        assert len(flat) == len(set(flat)) == 3 * expected  # each sample at most once per epoch
    assert epoch0 != epoch1 and sampler.state_dict() == {"epoch": 2, "batch_in_epoch": 0}
    assert take(iter(BucketBatchSampler(buckets, 3, seed=7)), expected) == epoch0  # deterministic
    assert take(iter(BucketBatchSampler(buckets, 3, seed=8)), expected) != epoch0


def test_two_ranks_see_the_global_batches_of_one_rank_with_double_batch():
    buckets, b = random_buckets(1), 2
    single = BucketBatchSampler(buckets, 2 * b, seed=3)
    ranks = [BucketBatchSampler(buckets, b, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    n = 2 * len(single) + 3  # across two epoch boundaries
    expected = take(iter(single), n)
    got0, got1 = take(iter(ranks[0]), n), take(iter(ranks[1]), n)
    assert [a + c for a, c in zip(got0, got1)] == expected


def test_sampler_resumes_exactly():
    buckets = random_buckets(2)
    reference = BucketBatchSampler(buckets, 2, seed=5)
    n = len(reference)
    expected = take(iter(reference), 3 * n)
    for stop in (1, n - 1, n, n + 2):
        first = BucketBatchSampler(buckets, 2, seed=5)
        assert take(iter(first), stop) == expected[:stop]
        state = first.state_dict()
        assert state == first.state_at(stop)
        resumed = BucketBatchSampler(buckets, 2, seed=5)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert take(iter(resumed), n + 1) == expected[stop:stop + n + 1]
    with pytest.raises(DataError, match="does not fit"):
        reference.load_state_dict({"epoch": 0, "batch_in_epoch": n + 1})


def test_sampler_small_buckets(caplog):
    buckets = {"1.0": list(range(10)), "0.5": [10, 11], "2.0": [12, 13, 14, 15, 16]}
    with caplog.at_level(logging.WARNING):
        sampler = BucketBatchSampler(buckets, batch_size=2, world_size=2, rank=1)
    assert "bucket 0.5 has 2 samples" in caplog.text and set(sampler.buckets) == {"1.0", "2.0"}
    assert len(sampler) == 2 + 1
    with pytest.raises(DataError, match=r"global batch of 16 .*largest bucket, 1.0, has 10 samples"):
        BucketBatchSampler(buckets, batch_size=8, world_size=2)
    padded = BucketBatchSampler(buckets, batch_size=4, drop_last=False)
    epoch = take(iter(padded), len(padded))
    assert len(padded) == 3 + 1 + 2 and all(len(b) == 4 for b in epoch)
    assert {i for b in epoch for i in b} == set(range(17))


# ----------------------------------------------------------------------------------------------------------
# Feature extraction and the cache


def test_cache_matches_direct_encoding(vae_cache, shapes_dir, te_cfg, vae_cfg):
    dataset = FeatureDataset(vae_cache)
    records = {json.loads(line)["image"]: json.loads(line) for line in (shapes_dir / "metadata.jsonl").open()}
    text_encoder, vae = load_text_encoder(te_cfg), load_autoencoder(vae_cfg)
    assert len(dataset) == 8 and set(dataset.buckets) == {"1.0", "0.6", "1.67"}
    for i in range(len(dataset)):
        sample, entry = dataset[i], dataset.entries[i]
        meta = records[f"{entry['key']}.png"]
        h, w = meta["height"], meta["width"]
        assert (entry["height"], entry["width"]) == (h, w) and entry["caption"] == meta["caption"]
        assert sample["latent"].shape == (4, h // 8, w // 8) == sample["control"].shape
        assert sample["latent"].dtype == sample["y"].dtype == torch.float32 and sample["mask"].dtype == torch.long
        assert sample["resolution"].tolist() == [h, w] and sample["aspect_ratio"].tolist() == pytest.approx([h / w])
        z = vae.encode(raw_pixels(shapes_dir / meta["image"]), sample=False)[0]
        c = vae.encode(raw_pixels(shapes_dir / meta["edge"]), sample=False)[0]
        y, mask = text_encoder.encode([meta["caption"]])
        torch.testing.assert_close(sample["latent"], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sample["control"], c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sample["y"], y[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(sample["mask"], mask[0])
    report = json.loads((vae_cache / "report.json").read_text())
    assert report["status"] == "ok" and report["processed"] == report["indexed"] == 8 and report["skipped"] == []


def test_loader_batches_never_mix_aspect_ratios(vae_cache):
    dataset = FeatureDataset(vae_cache)
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for step, batch in zip(range(3 * len(sampler)), loader):
        buckets = {dataset.entries[i]["bucket"] for i in batch["index"].tolist()}
        assert len(buckets) == 1, f"step {step} mixes buckets {buckets}"
        n, _, h, w = batch["latent"].shape
        assert batch["control"].shape == batch["latent"].shape and batch["y"].shape == (n, 16, 32)
        assert batch["resolution"].tolist() == [[h * 8.0, w * 8.0]] * n and batch["aspect_ratio"].shape == (n, 1)
    with pytest.raises(DataError, match="mixes latent shapes"):
        collate([dataset[i] for i in (dataset.buckets["1.0"][0], dataset.buckets["0.6"][0])])


def test_missing_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(DataError, match="tools/extract_features.py"):
        FeatureDataset(tmp_path / "nothing")
    (tmp_path / "index.jsonl").write_text("")
    with pytest.raises(DataError, match="empty index.jsonl.*tools/extract_features.py"):
        FeatureDataset(tmp_path)


def test_extraction_resumes_and_recomputes_only_missing_files(shapes_dir, te_cfg, tmp_path):
    cache = tmp_path / "cache"
    run = dict(base_size=BASE, progress=False, batch_size=4)
    bf16 = TextEncoderConfig(**{**te_cfg.__dict__, "dtype": "bf16"})
    assert extract(shapes_dir, cache, bf16, PIXEL, **run)["processed"] == 8
    index = (cache / "index.jsonl").read_bytes()
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    again = extract(shapes_dir, cache, bf16, PIXEL, **run)
    assert (again["processed"], again["up_to_date"]) == (0, 8)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == files

    victim = cache / sample_file("000004")
    victim.unlink()
    assert extract(shapes_dir, cache, bf16, PIXEL, **run)["processed"] == 1
    assert victim.is_file() and (cache / "index.jsonl").read_bytes() == index
    assert all(p.stat().st_mtime_ns == t for p, t in files.items() if p != victim)
    with safe_open(str(victim), framework="pt") as f:
        assert f.get_tensor("y").dtype == torch.bfloat16 and f.get_tensor("mask").dtype == torch.int8
        assert f.metadata()["caption"] == (shapes_dir / "000004.txt").read_text()
    sample = FeatureDataset(cache)[4]
    assert sample["y"].dtype == torch.float32 and sample["latent"].shape == (3, *sample["resolution"].int().tolist())

    other = extract(shapes_dir, cache, te_cfg, PIXEL, **run)  # other settings (fp32 T5): every sample is stale
    assert other["processed"] == 8


def test_sharded_extraction_equals_one_rank(shapes_dir, te_cfg, vae_cfg, tmp_path, monkeypatch):
    run = dict(base_size=BASE, progress=False, batch_size=3, control="canny")
    extract(shapes_dir, tmp_path / "one", te_cfg, vae_cfg, **run)
    with monkeypatch.context() as env:  # rank 1 finishes first; rank 0 then finds its done file
        env.setenv("RANK", "1")
        env.setenv("WORLD_SIZE", "2")
        part = extract(shapes_dir, tmp_path / "two", te_cfg, vae_cfg, **run)
    assert part["processed"] == 4 and not (tmp_path / "two" / "index.jsonl").exists()
    report = extract(shapes_dir, tmp_path / "two", te_cfg, vae_cfg, rank=0, world_size=2, **run)
    assert report["processed"] == 8 and report["world_size"] == 2 and not list((tmp_path / "two").glob(".done*"))
    assert (tmp_path / "one" / "index.jsonl").read_bytes() == (tmp_path / "two" / "index.jsonl").read_bytes()
    one, two = cache_tensors(tmp_path / "one"), cache_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].keys() == two[key].keys() == {"latent", "y", "mask", "control"}
        for name in one[key]:
            torch.testing.assert_close(one[key][name], two[key][name], atol=1e-6, rtol=1e-6)


def broken_dataset(src: Path, dst: Path) -> Path:
    """The shapes set with captions from .txt files, image 000002 corrupt and caption 000005 missing."""
    copy_dataset(src, dst, txt_only=True)
    (dst / "000002.png").write_bytes((dst / "000002.png").read_bytes()[:60])  # truncated PNG
    (dst / "000005.txt").unlink()
    return dst


def test_bad_inputs_are_skipped_and_reported(shapes_dir, te_cfg, tmp_path):
    data = broken_dataset(shapes_dir, tmp_path / "data")
    report = extract(data, tmp_path / "cache", te_cfg, PIXEL, base_size=BASE, progress=False)
    skipped = {s["key"]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == {"000002", "000005"} and "000002.png" in skipped["000002"]
    assert "000005.txt" in skipped["000005"] and "caption" in skipped["000005"]
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["skipped"] == report["skipped"]
    assert len(FeatureDataset(tmp_path / "cache")) == report["indexed"] == report["processed"] == 6


def test_oversized_image_follows_on_error(shapes_dir, te_cfg, tmp_path, monkeypatch, caplog):
    """PIL's decompression-bomb guard (here at a lowered limit) is one more bad image: skipped and reported under
    --on-error skip, a clean exit 1 naming the file under stop."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 80)  # the set's images have 64 x 64 = 4096 pixels
    data = copy_dataset(shapes_dir, tmp_path / "data", txt_only=True)
    Image.new("RGB", (200, 100), "white").save(data / "000003.png")  # 20000 pixels: over 2x the limit
    Image.new("RGB", (100, 80), "white").save(data / "000004.png")   # 8000: over the limit, a warning in PIL
    report = extract(data, tmp_path / "cache", te_cfg, PIXEL, base_size=BASE, progress=False)
    skipped = {s["key"]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == {"000003", "000004"} and all("too large to decode" in r for r in skipped.values())
    argv = [str(data), str(tmp_path / "stop"), "--base-size", str(BASE), "--text-encoder", te_cfg.path,
            "--autoencoder", "pixel", "--on-error", "stop", "--no-progress", "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert "000003.png" in caplog.text and "too large to decode" in caplog.text


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (4, 4, 3) and (rgb == np.array([0, 64, 128, 255])[None, :, None]).all()


@pytest.mark.parametrize("broken", ["image", "caption"])
def test_on_error_stop_exits_nonzero_naming_the_file(broken, shapes_dir, te_cfg, tmp_path, caplog):
    data = copy_dataset(shapes_dir, tmp_path / "data", txt_only=True)
    if broken == "image":
        name = "000002.png"
        (data / name).write_bytes(b"garbage")
    else:
        name = "000005.txt"
        (data / name).unlink()
    cache = tmp_path / "cache"
    argv = [str(data), str(cache), "--base-size", str(BASE), "--text-encoder", te_cfg.path, "--autoencoder", "pixel",
            "--on-error", "stop", "--no-progress", "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert name in caplog.text and "--on-error stop" in caplog.text
    report = json.loads((cache / "report.json").read_text())
    assert report["status"] == "failed" and name in report["errors"][0]["reason"]
    assert not (cache / "index.jsonl").exists()


def test_bad_inputs_on_two_ranks(shapes_dir, te_cfg, tmp_path):
    data = copy_dataset(shapes_dir, tmp_path / "data")
    (data / "000002.png").write_bytes(b"garbage")  # record 2: rank 0 of 2
    (data / "000003.png").write_bytes(b"garbage")  # record 3: rank 1 of 2
    run = dict(base_size=BASE, progress=False, world_size=2)
    assert extract(data, tmp_path / "skip", te_cfg, PIXEL, rank=1, **run)["skipped"][0]["key"] == "000003"
    report = extract(data, tmp_path / "skip", te_cfg, PIXEL, rank=0, **run)
    assert [s["key"] for s in report["skipped"]] == ["000002", "000003"] and report["indexed"] == 6

    (data / "000002.png").write_bytes((shapes_dir / "000002.png").read_bytes())
    with pytest.raises(SampleError, match="000003.png"):
        extract(data, tmp_path / "stop", te_cfg, PIXEL, rank=1, on_error="stop", **run)
    with pytest.raises(SampleError, match="rank 1 stopped: .*000003.png"):
        extract(data, tmp_path / "stop", te_cfg, PIXEL, rank=0, on_error="stop", **run)
    assert json.loads((tmp_path / "stop" / "report.json").read_text())["status"] == "failed"
    assert not (tmp_path / "stop" / "index.jsonl").exists()


def test_usage_errors_exit_2(shapes_dir, te_cfg, tmp_path, caplog):
    def run(data, te=te_cfg.path, ae="pixel"):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            return main([str(data), str(tmp_path / "cache"), "--text-encoder", te, "--autoencoder", ae,
                         "--no-progress", "--device", "cpu"])

    assert run(tmp_path / "missing") == 2 and "DATA_DIR" in caplog.text and "missing" in caplog.text
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty") == 2 and "holds no examples" in caplog.text
    assert run(shapes_dir, te=str(tmp_path / "no_t5")) == 2 and "no_t5" in caplog.text
    assert run(shapes_dir, ae=str(tmp_path / "no_vae")) == 2 and "no_vae" in caplog.text
    assert not (tmp_path / "cache").exists()  # nothing was started


def test_cli_script_with_config_and_overrides(shapes_dir, tiny_t5_path, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "tools" / "extract_features.py"), str(shapes_dir), str(cache),
           "--base-size", str(BASE), "--config", "pixart_xl2_256", "--set", f"text_encoder.path={tiny_t5_path}",
           "--set", "text_encoder.max_tokens=8", "--autoencoder", "pixel", "--no-progress", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    sample = FeatureDataset(cache)[0]
    assert sample["y"].shape == (8, 32) and sample["latent"].shape[0] == 3


# ----------------------------------------------------------------------------------------------------------
# Canny


def test_canny_finds_the_shape_boundaries():
    for seed in range(4):
        objects = sample_scene(np.random.default_rng(seed), SceneSpec(max_objects=3))
        image, truth = render(objects, 128, 96), np.asarray(render_edges(objects, 128, 96))[..., 0] > 127
        edges = canny(pil_to_tensor(image)).numpy()  # (96, 128) bool
        assert edges.sum() > 0.5 * truth.sum()
        assert (edges & dilate(truth, 2)).sum() >= 0.95 * edges.sum()  # edges lie on true boundaries
        assert (truth & dilate(edges, 2)).sum() >= 0.9 * truth.sum()  # and cover them


def test_canny_edges_are_thin_and_follow_hysteresis():
    contrast = torch.ones(120, dtype=torch.float64)  # a step at column 10 whose height fades down the rows:
    contrast[20:100] = torch.linspace(1.0, 0.06, 80, dtype=torch.float64)  # strong at the top, slow enough
    contrast[100:] = 0.06  # for no horizontal edge; the last 20 rows score about 0.15, between the thresholds
    image = torch.zeros(120, 30, dtype=torch.float64)
    image[:, 10:] = contrast[:, None]
    edges = canny(image)
    assert (edges.sum(dim=1) == 1).all() and edges[:, 9:11].any(dim=1).all(), "one thin edge, along the step"
    assert canny(image, low=0.16).any(dim=1).sum() == 100, "the weak rows survive only by hysteresis"
    isolated = torch.zeros(40, 40, dtype=torch.float64)
    isolated[:, 10:] = 0.06
    assert not canny(isolated).any(), "an isolated weak edge is dropped"
    assert canny(isolated * 2).sum() == 40
    single = ShapeObject("square", "red", "large", 0.5, 0.5)
    assert canny(pil_to_tensor(render([single], 64, 64))).any()

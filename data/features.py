"""The feature cache the trainers read: VAE latents and T5 caption features, one safetensors file per sample.

    CACHE/index.jsonl                          one line per sample: key, bucket, height, width, caption, file
    CACHE/samples/<ab>/<abcdef...>.safetensors latent (C, h, w) f32, y (L, D) in the encoder dtype, mask (L,) int8,
                                               control (C, h, w) f32 if extracted; metadata: key, caption, bucket,
                                               size, settings (encoders, base size, control kind)
    CACHE/report.json                          what the last tools/extract_features.py run did

    dataset = FeatureDataset("cache/")
    sample = dataset[0]       # latent, y, mask, resolution [h, w], aspect_ratio [h / w], control?, index
    batch = collate([dataset[i] for i in batch_indices])

Also here: the image preprocessing of the extraction (prepare_image).
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from common.files import atomic_path
from common.safetensors_file import save_file
from data.buckets import group_by_bucket
from data.folder import DataError
from models.aspect_ratios import resize_and_center_crop

log = logging.getLogger(__name__)

FORMAT = "pixart-delta-features/1"  # metadata["format"] of every sample file
INDEX_NAME = "index.jsonl"
REPORT_NAME = "report.json"
SAMPLES_DIR = "samples"
INDEX_FIELDS = ("key", "bucket", "height", "width", "caption", "file")
EXTRACT_HINT = ("run tools/extract_features.py DATA_DIR CACHE_DIR --config CONFIG --base-size SIDE to build it "
                "(SIDE: the side of the model's images, model.latent_size x the autoencoder's downsampling: 32 for the "
                "shapes presets, which are in pixel space; 256, 512 or 1024 for PixArt-XL-2)")


# ----------------------------------------------------------------------------------------------------------
# Files of the cache


def sample_file(key: str) -> str:
    """Path of a sample's file relative to the cache: samples/<2 hex>/<32 hex>.safetensors from sha256(key)."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"{SAMPLES_DIR}/{digest[:2]}/{digest}.safetensors"


def write_sample(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one sample's tensors and string metadata atomically (no half-written file survives a crash)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": FORMAT, **metadata})


def read_sample_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a sample file; None when the file is missing, unreadable or not a sample file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError):
        return None
    return meta if meta.get("format") == FORMAT else None


def write_index(cache_dir: str | Path, entries: list[dict]) -> Path:
    """Write index.jsonl atomically: one JSON object per sample with the INDEX_FIELDS, sorted by key."""
    path = Path(cache_dir) / INDEX_NAME
    lines = [json.dumps({k: e[k] for k in INDEX_FIELDS}) + "\n" for e in sorted(entries, key=lambda e: e["key"])]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return path


def read_index(cache_dir: str | Path) -> list[dict]:
    """The index lines of a cache; DataError that says how to build it when there is none."""
    cache_dir = Path(cache_dir)
    path = cache_dir / INDEX_NAME
    if not cache_dir.is_dir():
        raise DataError(f"feature cache {str(cache_dir)!r} does not exist; {EXTRACT_HINT}")
    if not path.is_file():
        raise DataError(f"feature cache {str(cache_dir)!r} has no {INDEX_NAME} (extraction never finished?); "
                        f"{EXTRACT_HINT}")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e}); {EXTRACT_HINT} again") from e
            missing = [k for k in INDEX_FIELDS if k not in entry]
            if missing:
                raise DataError(f"{path}:{lineno} lacks {', '.join(missing)}; {EXTRACT_HINT} again")
            entries.append(entry)
    if not entries:
        raise DataError(f"feature cache {str(cache_dir)!r} has an empty {INDEX_NAME} (no usable samples); "
                        f"check {cache_dir / REPORT_NAME}, fix the data and {EXTRACT_HINT}")
    return entries


# ----------------------------------------------------------------------------------------------------------
# The data set


class FeatureDataset(torch.utils.data.Dataset):
    """Samples of a feature cache, in index order; `buckets` groups them by aspect ratio for BucketBatchSampler."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.entries = read_index(self.cache_dir)
        self.buckets = group_by_bucket([e["bucket"] for e in self.entries])
        for key, indices in self.buckets.items():
            sizes = {(self.entries[i]["height"], self.entries[i]["width"]) for i in indices}
            if len(sizes) > 1:
                raise DataError(f"bucket {key} of {self.cache_dir} holds several sizes {sorted(sizes)}: the cache "
                                f"mixes extraction runs with different --base-size; extract into a new folder")
        log.info("feature cache %s: %d samples in %d buckets", self.cache_dir, len(self.entries), len(self.buckets))

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the first sample's tensors, e.g. {"latent": (C, h, w), "y": (L, D), ...}, without reading
        their data (one safetensors header)."""
        entry = self.entries[0]
        path = self.cache_dir / entry["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise DataError(f"cannot read sample {entry['key']!r} from {str(path)!r} ({e}); {EXTRACT_HINT} again "
                            f"(it recomputes missing files only)") from e

    def check_fits(self, latent_size: int, channels: int) -> None:
        """The cache fits a model whose latents have `latent_size` pixels per side and `channels` channels; a cache of
        another size would train at the wrong resolution (slowly, or out of memory), so it is refused."""
        entry = self.entries[0]
        c, h, w = self.shapes()["latent"]
        side = int(entry["height"]) // h * latent_size  # the image side the model is made for
        how = f"tools/extract_features.py DATA_DIR NEW_CACHE_DIR --config CONFIG --base-size {side}"
        if c != channels:
            raise DataError(f"the feature cache {str(self.cache_dir)!r} holds {c}-channel latents but the model takes "
                            f"{channels} (model.in_channels): it was extracted with another autoencoder; extract "
                            f"again with the config's autoencoder: {how}")
        if not 0.5 <= (h * w) / latent_size**2 <= 2.0:  # aspect-ratio buckets keep about latent_size^2 tokens
            raise DataError(f"the feature cache {str(self.cache_dir)!r} holds {entry['width']}x{entry['height']} "
                            f"images ({w}x{h} latents), but the model is made for {side}x{side} (model.latent_size "
                            f"{latent_size}): training on it would run at the wrong size. Extract again into a new "
                            f"folder: {how}")

    def __getitem__(self, i: int) -> dict:
        """latent (C, h, w), y (L, D) f32, mask (L,) long, resolution (2,) [h, w] px, aspect_ratio (1,), control?."""
        entry = self.entries[i]
        path = self.cache_dir / entry["file"]
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as e:
            raise DataError(f"cannot read sample {entry['key']!r} from {str(path)!r} ({e}); {EXTRACT_HINT} again "
                            f"(it recomputes missing files only)") from e
        h, w = float(entry["height"]), float(entry["width"])
        sample = {
            "latent": tensors["latent"].float(),                 # (C, h/f, w/f)
            "y": tensors["y"].float(),                           # (L, D)
            "mask": tensors["mask"].long(),                      # (L,)
            "resolution": torch.tensor([h, w]),                  # (2,) pixels
            "aspect_ratio": torch.tensor([h / w]),               # (1,)
            "index": i,
        }
        if "control" in tensors:
            sample["control"] = tensors["control"].float()       # (C, h/f, w/f)
        return sample


def batch_conditions(model, batch: dict) -> dict:
    """A collated batch as the model's conditions: caption features and mask, plus the image size and aspect ratio
    for multi-scale (MS) models."""
    cond = {"y": batch["y"], "mask": batch["mask"]}
    if model.micro_conditions:
        cond.update(resolution=batch["resolution"], aspect_ratio=batch["aspect_ratio"])
    return cond


def collate(samples: list[dict]) -> dict:
    """Stack a list of FeatureDataset samples: latent (N, C, h, w), y (N, L, D), mask (N, L), index (N,), ..."""
    if not samples:
        raise DataError("collate got an empty batch")
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(f"batch mixes latent shapes {sorted(shapes)} (samples {[s['index'] for s in samples]}); "
                        f"draw batches with BucketBatchSampler so each holds one aspect-ratio bucket")
    with_control = sum("control" in s for s in samples)
    if 0 < with_control < len(samples):
        raise DataError(f"{with_control} of {len(samples)} samples in the batch have a control latent: "
                        f"the cache mixes extractions with and without --control")
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "index"}
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB (or L) PIL image -> (C, H, W) float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, C) or (H, W)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Cover height x width (antialiased bilinear), center-crop to it, scale to [-1, 1]: (3, height, width).

    PIL's resize antialiases when shrinking (as torchvision's Resize on PIL images in PixArt's data pipeline);
    the cover size is rounded so that resize_and_center_crop only crops.
    """
    w, h = image.size
    scale = max(height / h, width / w)
    cover = (max(width, round(w * scale)), max(height, round(h * scale)))  # (W, H) for PIL
    if cover != (w, h):
        image = image.resize(cover, Image.BILINEAR)
    x = pil_to_tensor(image)[None]  # (1, 3, H', W')
    x = resize_and_center_crop(x, height, width)[0]  # (3, height, width)
    return x * 2 - 1

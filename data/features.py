"""The feature cache the trainers read: VAE latents and T5 caption features, one safetensors file per sample.

    CACHE/index.jsonl                          one line per sample: key, bucket, height, width, caption, file
    CACHE/samples/<ab>/<abcdef...>.safetensors latent (C, h, w) f32, y (L, D) in the encoder dtype, mask (L,) int8,
                                               control (C, h, w) f32 if extracted; metadata: key, caption, bucket,
                                               size, settings (encoders, base size, control kind)
    CACHE/report.json                          what the last tools/extract_features.py run did

    dataset = FeatureDataset("cache/")
    sample = dataset[0]       # latent, y, mask, resolution [h, w], aspect_ratio [h / w], control?, index
    batch = collate([dataset[i] for i in batch_indices])

Also here: the image preprocessing of the extraction (prepare_image) and a hand-written Canny edge detector.
"""

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from data.buckets import group_by_bucket
from data.folder import DataError
from models.aspect_ratios import resize_and_center_crop
from models.checkpoint import atomic_path

log = logging.getLogger(__name__)

FORMAT = "pixart-delta-features/1"  # metadata["format"] of every sample file
INDEX_NAME = "index.jsonl"
REPORT_NAME = "report.json"
SAMPLES_DIR = "samples"
INDEX_FIELDS = ("key", "bucket", "height", "width", "caption", "file")
EXTRACT_HINT = ("run tools/extract_features.py DATA_DIR CACHE_DIR --base-size 256 --text-encoder T5_PATH "
                "--autoencoder VAE_PATH to build it")


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


# ----------------------------------------------------------------------------------------------------------
# Canny edges (skimage's conventions: image in [0, 1], Gaussian sigma 1, thresholds on the raw Sobel magnitude)


def _gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, H, W), reflect padding, radius ceil(3 sigma)."""
    if sigma <= 0:
        return gray
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, gray.shape[-1] - 1, gray.shape[-2] - 1)  # reflect padding needs radius < side
    x = torch.arange(-radius, radius + 1, dtype=gray.dtype)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    gray = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(gray, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep (H, W) pixels whose magnitude is a maximum along the gradient direction, quantized to 45 degrees."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # (H, W) in [0, 180)
    sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135 degrees
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]  # (H+2, W+2), zeros outside
    H, W = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    # Neighbour pairs along the gradient; rows grow downwards, so a 45-degree gradient points to (+1, +1).
    pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for s, (a, b) in enumerate(pairs):  # strict on one side: of a two-pixel plateau across a step, keep one
        local_max = (magnitude > shifted(*a)) & (magnitude >= shifted(*b))
        keep |= (sector == s) & local_max
    return keep & (magnitude > 0)


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Weak (H, W) pixels 8-connected through weak pixels to a strong one (label propagation + pointer jumping)."""
    H, W = weak.shape
    ids = torch.arange(1, H * W + 1, dtype=torch.float64).view(H, W)  # exact integers in float64
    labels = torch.where(weak, ids, torch.zeros_like(ids))
    while True:
        spread = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * weak  # max label of neighbours
        flat = spread.flatten()
        jumped = flat[(flat.long() - 1).clamp(min=0)] * (flat > 0)  # label of the pixel my label names
        new = torch.maximum(flat, jumped).view(H, W)
        if torch.equal(new, labels):
            break
        labels = new
    winners = torch.unique(labels[strong & weak])
    return torch.isin(labels, winners) & weak


def canny(image: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Canny edges of an image (3, H, W) or (H, W) in [0, 1]: (H, W) bool.

    Grayscale (ITU-R 601 luma) -> Gaussian blur -> Sobel gradients -> non-maximum suppression -> pixels with
    magnitude >= high, plus those >= low connected to them (hysteresis). The magnitude is the unnormalized
    Sobel response, so a sharp black-to-white step scores up to 4 (about 2.7 after the sigma-1 blur).
    """
    if image.dim() == 3:
        if image.shape[0] != 3:
            raise ValueError(f"canny takes (3, H, W) or (H, W) images, got {tuple(image.shape)}")
        gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # (H, W)
    elif image.dim() == 2:
        gray = image
    else:
        raise ValueError(f"canny takes (3, H, W) or (H, W) images, got {tuple(image.shape)}")
    if low > high:
        raise ValueError(f"canny thresholds need low <= high, got low={low}, high={high}")
    gray = _gaussian_blur(gray.double()[None, None], sigma)  # (1, 1, H, W)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x.view(1, 1, 3, 3))[0, 0]  # (H, W), d/dx (columns)
    gy = F.conv2d(padded, sobel_x.t().contiguous().view(1, 1, 3, 3))[0, 0]  # (H, W), d/dy (rows)
    magnitude = torch.hypot(gx, gy)  # (H, W)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    return _hysteresis(thin & (magnitude >= high), thin & (magnitude >= low))


def edges_to_control(edges: torch.Tensor) -> torch.Tensor:
    """(H, W) bool edge map -> (3, H, W) control image, white edges on black, in [-1, 1]."""
    return edges.float()[None].expand(3, -1, -1) * 2 - 1

"""The second shapes reader: a small CNN that reads kind, colour, size and position of an image's main object.

It shares nothing with the exact reader (evaluation/shapes.py): no palette segmentation, no components, no
template fitting. It sees the image resized to 32x32 and answers with five heads: whether the image holds an
object at all, and the kind, colour, size and 3x3 position of the largest one. It is trained on renders of
data/synthetic.py under augmentations that mimic generated images (evaluation/classifier_data.py,
train/train_reader.py), so where both readers agree on generated images, neither is fooled by what only one of
them is blind to.

    classifier = load_classifier("weights/shapes/reader.safetensors")
    readings = classify(classifier, images)          # images: RGB uint8 (H, W, 3), any size >= MIN_SIDE
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from common.errors import UserError
from data.synthetic import KINDS, PALETTE, POSITIONS, SIZES

INPUT_SIDE = 32                                     # every image is read at 32x32
HEADS = {                                           # head name -> the values it chooses among
    "kind": KINDS,
    "color": tuple(PALETTE),
    "size": tuple(SIZES),
    "position": tuple(name for row in POSITIONS for name in row),
}
FORMAT_TAG = "pixart-delta-shapes-classifier"       # metadata["format"] of a classifier file


class ClassifierError(UserError):
    """A classifier file that cannot be read; the message says why and how to get a good one."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Widths of the network; the file stores them, so a load rebuilds exactly what was trained."""

    channels: tuple[int, ...] = (32, 32, 64, 64, 32)   # five 3x3 convolutions; the 2nd, 4th and 5th halve the side
    hidden: int = 128                                  # the fully connected layer before the heads


@dataclass(frozen=True)
class Reading:
    """What the classifier reads in one image: object or not, and the main object's attributes with confidences."""

    object_probability: float
    kind: str
    color: str
    size: str
    position: str
    confidence: dict[str, float]        # softmax probability of each chosen value

    @property
    def has_object(self) -> bool:
        return self.object_probability >= 0.5

    def attributes(self) -> dict[str, str]:
        return {"kind": self.kind, "color": self.color, "size": self.size, "position": self.position}


class ShapeClassifier(nn.Module):
    """Five conv layers (BatchNorm, ReLU; three of them stride 2: 32 -> 4 pixels), one hidden layer, five heads."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        strides = (1, 2, 1, 2, 2)
        layers, width = [], 3
        for out, stride in zip(cfg.channels, strides):
            layers += [nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.features = nn.Sequential(*layers)
        side = INPUT_SIDE // 8
        self.hidden = nn.Sequential(nn.Linear(width * side * side, cfg.hidden), nn.ReLU())
        self.object_head = nn.Linear(cfg.hidden, 1)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.hidden, len(values)) for name, values in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, 32, 32) in [-1, 1] -> {"object": (N,) logits, "kind": (N, 5), "color": (N, 8), ...} logits."""
        h = self.features(x)                                   # (N, C, 4, 4)
        h = self.hidden(rearrange(h, "n c h w -> n (c h w)"))  # (N, hidden)
        out = {"object": self.object_head(h)[:, 0]}            # (N,)
        out.update({name: head(h) for name, head in self.heads.items()})
        return out


def to_input(image: np.ndarray) -> torch.Tensor:
    """(3, 32, 32) float tensor in [-1, 1] of an RGB uint8 image (H, W, 3) of any size (area resampling)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the classifier takes an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[:2] != (INPUT_SIDE, INPUT_SIDE):
        image = np.asarray(Image.fromarray(image).resize((INPUT_SIDE, INPUT_SIDE), Image.BOX))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # a copy: writable


@torch.no_grad()
def classify(model: ShapeClassifier, images: list[np.ndarray], batch_size: int = 256) -> list[Reading]:
    """The classifier's reading of each RGB uint8 image (H, W, 3)."""
    model.eval()
    readings = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([to_input(im) for im in images[start:start + batch_size]])  # (B, 3, 32, 32)
        out = model(x)
        objectness = torch.sigmoid(out["object"])
        probs = {name: out[name].softmax(dim=1) for name in HEADS}
        for i in range(len(x)):
            chosen = {name: int(probs[name][i].argmax()) for name in HEADS}
            readings.append(Reading(
                float(objectness[i]), *(HEADS[name][chosen[name]] for name in HEADS),
                confidence={name: float(probs[name][i, chosen[name]]) for name in HEADS}))
    return readings


def save_classifier(model: ShapeClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """fp16 safetensors with the ClassifierConfig (and any extra string metadata) in the header; atomic."""
    from safetensors.torch import save_file

    from common.files import atomic_path

    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(asdict(model.cfg)), **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_classifier(path: str | Path) -> ShapeClassifier:
    """A classifier saved by save_classifier, in fp32 and eval mode; shipped files are hash-checked first."""
    from safetensors import SafetensorError, safe_open

    from models.shipped import verify_shipped

    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier weights {path} not found: use the shipped weights/shapes/reader.safetensors "
                              f"or train one with `python train/train_reader.py`")
    verify_shipped(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ClassifierError(f"cannot read classifier weights {path}: {e}") from e
    if meta.get("format") != FORMAT_TAG:
        raise ClassifierError(f"{path} is not a shapes classifier (metadata format {meta.get('format')!r}, expected "
                              f"{FORMAT_TAG!r}); train one with `python train/train_reader.py`")
    raw = json.loads(meta["config"])
    cfg = ClassifierConfig(channels=tuple(raw["channels"]), hidden=int(raw["hidden"]))
    model = ShapeClassifier(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise ClassifierError(f"{path} does not fit the classifier of its own config: missing keys {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()

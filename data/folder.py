"""Image-caption data sets on disk: a folder of images with a .txt caption beside each, or one JSONL file.

    folder = ImageCaptionFolder("shapes/")     # metadata.jsonl if present, else the .txt files
    for record in folder:                      # Record(image, caption, control, key), sorted by key
        image = load_image(record.image)       # RGB PIL image; DataError if unreadable
    folder.problems                            # [Problem(key, reason)]: missing captions, images, bad lines

Problems found while scanning are collected, never raised, so one bad file does not stop a large job;
the caller decides (tools/extract_features.py: --on-error skip|stop).
"""

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_MODES = ("auto", "txt", "jsonl")


class DataError(UserError):
    """A data set, file or cache that cannot be used; the message names it and what would be right."""


@dataclass(frozen=True)
class Record:
    """One training example: an image, its caption and optionally a control (edge) image."""

    image: Path            # the image file
    caption: str           # the caption text, stripped
    control: Path | None   # control image (white edges on black), or None
    key: str               # image path relative to the root, without suffix, '/'-separated; unique


@dataclass(frozen=True)
class Problem:
    """An example that could not be used, and why (the reason names the file)."""

    key: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file into an RGB PIL image (EXIF rotation applied, transparency over white)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, rather than decode gigabytes
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) grayscale: scale to 8 bits
                    image = _wide_grayscale_to_8bit(image)
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {str(path)!r} is too large to decode safely ({e}); downscale it, or raise "
                        f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from e
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e


def _wide_grayscale_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit PNG (mode I;16*, or I after PIL's widening) as 8-bit L: values / 257, so 65535 -> 255.
    PIL's own convert("RGB") clips such values at 255, which turns almost every pixel white."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8), mode="L")


def not_an_image_file(path: Path) -> str:
    """Why a path named like an image is not an image file: a folder, a looping or broken link, or nothing."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # (Python < 3.13 reports a symlink loop so)
            return f"{str(path)!r} is a symbolic link that loops back on itself, not an image file"
        except OSError as e:
            reason = "loops back on itself" if "loop" in str(e).lower() else "points to nothing"
            return f"{str(path)!r} is a symbolic link that {reason}, not an image file"
    if path.is_dir():
        return f"{str(path)!r} is a folder named like an image, not an image file"
    if not path.exists():
        return f"image file {str(path)!r} does not exist"
    return f"{str(path)!r} is not a regular file"


def _key(path: Path, root: Path) -> str:
    """'sub/dir/name' for root/sub/dir/name.png."""
    return path.relative_to(root).with_suffix("").as_posix()


class ImageCaptionFolder:
    """The records of a data set folder, sorted by key, plus the problems found while scanning it.

    captions="txt": every image under root (recursively; hidden entries and root/<control_dir> are not
    scanned) with a UTF-8 caption in a .txt file of the same name beside it; the control image of
    root/a/b.png is root/<control_dir>/a/b.png when that file exists (the synthetic set's edges/ layout).
    captions="jsonl": one line per example in root/<jsonl_name>, {"image": path, "caption": text} and
    optionally "edge": path of the control image; paths are relative to root.
    captions="auto": jsonl when root/<jsonl_name> exists, else txt.
    """

    def __init__(self, root: str | Path, captions: str = "auto", jsonl_name: str = "metadata.jsonl",
                 control_dir: str = "edges"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {str(self.root)!r} does not exist or is not a folder")
        if captions not in CAPTION_MODES:
            raise DataError(f"captions={captions!r} is not one of {', '.join(CAPTION_MODES)}")
        if captions == "auto":
            captions = "jsonl" if (self.root / jsonl_name).is_file() else "txt"
        self.mode = captions
        self.jsonl_path = self.root / jsonl_name
        self.control_dir = control_dir
        self.problems: list[Problem] = []
        found = self._scan_jsonl() if captions == "jsonl" else self._scan_txt()
        self.records = self._unique(found)
        self.problems.sort(key=lambda p: p.key)
        log.info("%s (%s captions): %d examples, %d problems", self.root, self.mode, len(self.records),
                 len(self.problems))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def _report(self, key: str, reason: str) -> None:
        self.problems.append(Problem(key, reason))

    def _unique(self, records: list[Record]) -> list[Record]:
        """Sort by key; a key claimed by two images (a.png and a.jpg) is a problem, both are dropped."""
        by_key: dict[str, list[Record]] = {}
        for r in records:
            by_key.setdefault(r.key, []).append(r)
        out = []
        for key in sorted(by_key):
            group = by_key[key]
            if len(group) > 1:
                names = ", ".join(sorted(str(r.image) for r in group))
                self._report(key, f"key {key!r} is claimed by several images ({names}); rename all but one")
            else:
                out.append(group[0])
        return out

    def _scan_txt(self) -> list[Record]:
        """Images with a caption .txt beside each."""
        control_root = self.root / self.control_dir if self.control_dir else None
        records = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if control_root is not None and path.is_relative_to(control_root):
                continue
            key = _key(path, self.root)
            if not path.is_file():  # named like an image but not a readable file: listed, never skipped silently
                self._report(key, not_an_image_file(path))
                continue
            caption_file = path.with_suffix(".txt")
            if not caption_file.is_file():
                self._report(key, f"missing caption file {str(caption_file)!r} for image {str(path)!r}")
                continue
            try:
                text = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                self._report(key, f"cannot read caption file {str(caption_file)!r}: {e}")
                continue
            if not text:
                self._report(key, f"caption file {str(caption_file)!r} is empty")
                continue
            control = control_root / rel if control_root is not None else None
            records.append(Record(path, text, control if control is not None and control.is_file() else None, key))
        return records

    def _scan_jsonl(self) -> list[Record]:
        """One {"image", "caption", "edge"?} object per line of the JSONL file."""
        if not self.jsonl_path.is_file():
            raise DataError(f"captions='jsonl' but {str(self.jsonl_path)!r} does not exist")
        records = []
        with open(self.jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.jsonl_path.name}:{lineno}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    self._report(where, f"{self.jsonl_path}:{lineno} is not valid JSON: {e}")
                    continue
                if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                    self._report(where, f"{self.jsonl_path}:{lineno} has no \"image\" path string")
                    continue
                path = self.root / item["image"]
                key = Path(item["image"]).with_suffix("").as_posix()
                caption = item.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    self._report(key, f"{self.jsonl_path}:{lineno} has no \"caption\" text for {item['image']!r}")
                    continue
                if not path.is_file():
                    self._report(key, f"{not_an_image_file(path)} (named at {self.jsonl_path}:{lineno})")
                    continue
                edge = item.get("edge")
                records.append(Record(path, caption.strip(), self.root / edge if edge else None, key))
        return records

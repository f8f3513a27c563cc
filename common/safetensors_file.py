"""safetensors files written byte for byte the same for the same tensors and metadata.

safetensors keeps the metadata in a hash map whose order changes from one process to the next, so the same weights
saved twice could differ in sha256. `save_file` here writes with safetensors and then rewrites the header with the
metadata keys sorted: the header keeps its length (same keys and values, other order), so only its bytes change.
"""

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, then the header's metadata sorted by key (reproducible bytes)."""
    _save_file(tensors, str(path), metadata=metadata)
    if metadata:
        sort_metadata(path)


def sort_metadata(path: str | Path) -> None:
    """Rewrite a safetensors header in place with `__metadata__` first and its keys sorted."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # (json escapes a character differently from safetensors: never seen)
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces too

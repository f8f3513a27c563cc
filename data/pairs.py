"""Noise-image pairs of a teacher's sampler (tools/make_ode_pairs.py writes them; the regression term of a DMD run,
dmd.pairs, reads them): one safetensors file with noise, image (N, C, h, w) f32, y (N, L, D) f32, mask (N, L) int8
and index (N,) int64, and metadata naming the teacher (path, sha256) and the sampler settings. A file made with
--start-timesteps also holds timestep (N,) int64, where each row's `noise` is (T - 1: pure noise; lower: the
teacher's image re-noised to that timestep)."""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from common.errors import UserError

FORMAT = "pixart-delta-ode-pairs/1"


def read_pairs_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a pairs file; a UserError naming the fix when it is missing, unreadable or not a pairs file."""
    how = "make it with python tools/make_ode_pairs.py OUT --config TEACHER_CONFIG --num N"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read the pairs file {str(path)!r} ({e}); {how}") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a noise-image pairs file (format {meta.get('format')!r}, expected "
                        f"{FORMAT!r}); {how}")
    return meta


def read_pairs_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of a pairs file, read from its header (nothing loads)."""
    read_pairs_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_pairs(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a pairs file (noise, image, y, mask, index; timestep when it has re-noised rows), checked for
    consistent lengths."""
    read_pairs_metadata(path)
    tensors = load_file(str(path))
    n = {k: len(v) for k, v in tensors.items()}
    if set(n) - {"timestep"} != {"noise", "image", "y", "mask", "index"} or len(set(n.values())) != 1:
        raise UserError(f"the pairs file {str(path)!r} is damaged (tensors and lengths {n}); make it again")
    return tensors


def read_pairs_timesteps(path: str | Path) -> list[int] | None:
    """The distinct start timesteps of a pairs file's rows (ascending), or None for a file of rows from noise only."""
    read_pairs_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        if "timestep" not in f.keys():
            return None
        return sorted(set(f.get_tensor("timestep").tolist()))

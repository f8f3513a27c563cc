"""Run folders and full training-state checkpoints (model, EMA, optimiser, scheduler, step, data position, RNG).

Checkpoints are written to a temporary file and renamed, and `latest.txt` is updated only after the rename, so
an interrupted write never replaces a good checkpoint.
"""

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from common.errors import CheckpointError, UserError
from common.files import TRAIN_STATE_FORMAT, atomic_path
from models.checkpoint import Checkpoint, infer_config
from models.formats.safetensors import config_from_json

FORMAT = TRAIN_STATE_FORMAT


class ResumeError(UserError):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


def new_run_dir(root: str | os.PathLike, name: str) -> Path:
    """root/NNNNN-name with the next free number. Runs started at the same moment (two evaluations side by side) may
    count the same folders: whichever creates the folder first keeps the number, the other takes the next one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    number = _next_run_number(root)
    while True:
        run = root / f"{number:05d}-{name}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            number = max(number + 1, _next_run_number(root))


def _next_run_number(root: Path) -> int:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def _portable_rng(state: dict) -> dict:
    """RNG states as tensors and lists, so the checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    out = dict(state, numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss])
    version, internal, gauss_next = state["python"]
    out["python"] = [version, list(internal), gauss_next]
    return out


def _native_rng(state: dict) -> dict:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    return dict(state, numpy=(kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
                python=(version, tuple(internal), gauss_next))


def save_state(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step_NNNNNNNN.pt atomically, point latest.txt at it, keep the newest `keep`."""
    folder = run_dir / "checkpoints"
    path = folder / f"step_{step:08d}.pt"
    state = {**state, "format": FORMAT, "step": step, "rng": _portable_rng(state["rng"])}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / "latest.txt") as tmp:
        tmp.write_text(path.name + "\n")
    for old in sorted(folder.glob("step_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint latest.txt names, if any."""
    pointer = run_dir / "checkpoints" / "latest.txt"
    if not pointer.is_file():
        return None
    return run_dir / "checkpoints" / pointer.read_text().strip()


def resolve_resume(target: str | os.PathLike) -> tuple[Path, Path]:
    """(run folder, checkpoint file) from a run folder or a checkpoint path."""
    target = Path(target)
    if target.is_dir():
        ckpt = latest_checkpoint(target)
        if ckpt is None:
            raise ResumeError(f"{target} holds no checkpoints/latest.txt: nothing to resume (is it a run folder?)")
        return target, ckpt
    if target.is_file():
        if target.suffix != ".pt" or target.parent.name != "checkpoints":
            hint = (f"resume the run folder ({target.parent}) or one of its checkpoints/step_*.pt"
                    if (target.parent / "checkpoints").is_dir() else "resume a run folder or its checkpoints/step_*.pt")
            raise ResumeError(f"--resume {target}: not a training checkpoint (those are RUN/checkpoints/step_*.pt); "
                              f"{hint}, or start a new run from these weights with --set train.init_from={target}")
        return target.parent.parent, target
    raise ResumeError(f"--resume {target}: no such run folder or checkpoint file")


def load_state(path: Path, device: torch.device) -> dict:
    """Read a training-state checkpoint, with a clear error for a corrupt file or another kind of file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ResumeError(f"cannot read training checkpoint {path}: {type(e).__name__}: {str(e)[:200]} "
                          f"(corrupt or truncated? resume from an older checkpoints/step_*.pt)") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a training-state checkpoint of this project (weights-only files "
                          f"fine-tune through train.init_from instead)")
    state["rng"] = _native_rng(state["rng"])
    return state


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: saved -> current' for every differing leaf of two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def network_state(state: dict, name: str | None = None) -> dict:
    """One trained network's entries of a training-state checkpoint ({"model", "ema", "optimizer", "scheduler",
    "scaler"}): network `name`, or the exported one. Reads the single-network layout of older checkpoints."""
    networks = state.get("networks") or {"model": {k: state.get(k) for k in ("model", "ema", "optimizer",
                                                                             "scheduler", "scaler")}}
    if name is None:
        return networks[state["exported"]] if state.get("exported") in networks else next(iter(networks.values()))
    if name not in networks:
        raise ResumeError(f"the checkpoint trains the networks {sorted(networks)}, not {name!r}")
    return networks[name]


def checkpoint_networks(path: Path) -> list[str]:
    """The names of the networks a training checkpoint trains, reading no tensor data (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ResumeError(f"cannot read training checkpoint {path}: {type(e).__name__}: {str(e)[:200]} "
                          f"(corrupt or truncated? resume from an older checkpoints/step_*.pt)") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a training-state checkpoint of this project")
    return list(state.get("networks") or {"model": None})


# ----------------------------------------------------------------------------------------------------------
# Reading a training checkpoint's weights (tools/convert_checkpoint.py exports them)


def is_training_state(path: str | os.PathLike) -> bool:
    """Whether `path` is a training checkpoint of engine/state.py (read memory-mapped, so cheap)."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return False
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT


def read_training_state(path: str | os.PathLike, weights: str = "ema") -> Checkpoint:
    """The PixArt weights inside a training checkpoint: its EMA ("ema", what the run exports) or the raw training
    weights ("model"), with the run's model config and the run config as metadata (like the exported files).

    Only runs that train a whole PixArt (train.py, train_lcm.py) have one; a ControlNet run trains a branch."""
    path = Path(path)
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights={weights!r}: a training checkpoint holds 'ema' or 'model' weights")
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # the optimiser state is never read
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    # the exported network (named in the state; else the first that keeps an EMA, else the first); checkpoints of
    # single-network runs written before tasks had several networks: the state itself
    networks = state.get("networks") or {"model": state}
    name = state.get("exported") or next((n for n, v in networks.items() if v.get("ema")), next(iter(networks)))
    network = networks[name]
    if not network.get("model") or not isinstance(state.get("config"), dict) or "model" not in state["config"]:
        raise CheckpointError(f"{path} is a training checkpoint without its model weights or run config (truncated, "
                              f"or written by another version?)")
    sd = dict(network["model"])
    if any(k.startswith("branch.") for k in sd):
        raise CheckpointError(f"{path} is the training state of a ControlNet branch, not of a PixArt: use the "
                              f"branch its run exports (control.safetensors)")
    if weights == "ema":
        if not network.get("ema"):
            raise CheckpointError(f"{path} kept no EMA (the run had train.ema_decay 0): export --weights model")
        sd.update(network["ema"]["shadow"])
    run = state["config"]
    # the run config's model section, with what the task adds to it read off the weights (as for any checkpoint):
    # an LCM student with a guidance input (distill.guidance_embedding) is not declared in that section
    found = infer_config(sd)  # a DMD generator may be deeper than the run's model (dmd.generator_depth)
    cfg = replace(config_from_json(json.dumps(run["model"]), path), guidance_embedding=found["guidance_embedding"],
                  depth=found["depth"])
    metadata = {"config": yaml.safe_dump(run, sort_keys=False), "step": str(state["step"])}
    return Checkpoint(sd, "training-state", path, cfg, metadata)

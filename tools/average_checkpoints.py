"""Average the weights of several checkpoints of one architecture into one file (checkpoint averaging: the uniform
mean of the EMA weights a run saved at several steps, which smooths the step-to-step wander that an EMA of short
window leaves; or a weighted mean with --weights).

    python tools/average_checkpoints.py work/shapes/dmd4-avg.safetensors \\
        RUN/curve/step_00000400.ema.safetensors RUN/curve/step_00000600.ema.safetensors \\
        RUN/curve/step_00000800.ema.safetensors

Every input is read by the project's loader (any format it reads, int8-weights files restored to float first; a
run's training checkpoint, checkpoints/step_*.pt, gives its EMA) and checked against the first one's architecture;
the mean is taken in float64 and written as this project's safetensors in float32 (or --dtype). The output keeps the
first input's metadata (its run config, which the samplers read for e.g. a generator's timesteps) and adds
`averaged_from` (each input's path, sha256, step and weight); --metadata-from FILE carries FILE's metadata instead
(a run's own export records what its task adds, e.g. a DMD generator's timesteps, which training checkpoints lack).
Inputs whose run configs differ are averaged with a
warning (a weight soup of several runs); the output says which it came from.
Nothing is written unless every input reads and fits.
"""

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from common.errors import CheckpointError, UserError
from engine.state import is_training_state, read_training_state
from models.checkpoint import check_state_dict, load_checkpoint, peek, save_checkpoint
from models.pixart import build_pixart
from models.shipped import content_hash
from models.variants import PixArtConfig

log = logging.getLogger("average_checkpoints")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], PixArtConfig, dict[str, str]]:
    """A checkpoint's float weights (official keys), architecture and metadata: a training state's EMA, or any file
    the loader reads (int8-weights restored to float)."""
    if is_training_state(path):
        ckpt = read_training_state(path, "ema")
        check_state_dict(build_pixart(ckpt.config, device="meta"), ckpt.config, ckpt.state_dict, str(path))
        sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items() if k != "pos_embed"}
        return sd, ckpt.config, ckpt.metadata
    model, cfg, _ = load_checkpoint(path)
    return {k: v for k, v in model.state_dict().items() if k != "pos_embed"}, cfg, peek(path).metadata


def describe_config_difference(a, b) -> str:
    """The architecture fields in which configs a and b differ, as 'field a vs b'."""
    a, b = asdict(a.resolved()), asdict(b.resolved())
    return ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))


def average_checkpoints(out: Path, files: list[Path], weights: list[float] | None = None,
                        dtype: torch.dtype = torch.float32, metadata_from: Path | None = None) -> Path:
    """Write the weighted mean of `files`' weights (uniform when weights is None) to `out`; returns out.
    metadata_from: a checkpoint whose metadata the output carries instead of the first input's (a run's own export,
    which holds what its task records, e.g. a DMD generator's timesteps and teacher)."""
    if len(files) < 2:
        raise UserError(f"give at least two checkpoints to average, got {len(files)}")
    if out.suffix != ".safetensors":
        raise UserError(f"the averaged checkpoint is written as safetensors: its name must end in .safetensors, got "
                        f"{str(out)!r}")
    if out.resolve() in [f.resolve() for f in files]:
        raise UserError(f"the output {out} is one of the inputs: write it elsewhere")
    weights = [1.0] * len(files) if weights is None else weights
    if len(weights) != len(files):
        raise UserError(f"--weights gives {len(weights)} weights for {len(files)} checkpoints: give one per checkpoint")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights must be finite, >= 0 and not all 0, got {weights}")
    missing = [str(f) for f in [*files, *([metadata_from] if metadata_from else [])] if not f.exists()]
    if missing:
        raise UserError(f"no such checkpoint: {', '.join(missing)}")
    total, cfg, first_meta, steps = None, None, None, []
    for f, w in zip(files, weights):
        sd, f_cfg, meta = read_weights(f)  # a damaged file is named here
        steps.append(meta.get("step"))
        if cfg is None:
            total, cfg, first_meta = {k: v.double() * w for k, v in sd.items()}, f_cfg, meta
            continue
        if f_cfg.resolved() != cfg.resolved():
            raise CheckpointError(f"{f} does not fit the architecture of {files[0]}, the first checkpoint: "
                                  f"{describe_config_difference(f_cfg, cfg)}")
        if meta.get("config") != first_meta.get("config"):
            log.warning("%s comes from another run config than %s: the average (a weight soup) carries the first's",
                        f, files[0])
        for k, v in sd.items():
            total[k] += v.double() * w
    norm = sum(weights)
    sd = {k: (v / norm).to(dtype) if v.is_floating_point() else v for k, v in total.items()}
    if metadata_from is not None:
        first_meta = peek(metadata_from).metadata  # a training checkpoint here is refused by peek, with its reason
    meta = {k: v for k, v in first_meta.items() if k not in ("format", "model_config", "quantization")}
    meta["averaged_from"] = json.dumps([{"path": str(f), "sha256": content_hash(f),
                                         "step": step, "weight": w / norm}
                                        for f, step, w in zip(files, steps, weights)])
    save_checkpoint(sd, cfg, out, "safetensors", metadata=meta)
    log.info("wrote %s: the mean of %d checkpoints (weights %s)", out, len(files),
             ", ".join(f"{w / norm:.3g}" for w in weights))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the averaged checkpoint to write (.safetensors)")
    p.add_argument("files", type=Path, nargs="+", help="checkpoints of one architecture (any format the loader reads)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per checkpoint (normalised to sum 1); default: uniform")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the stored dtype of the mean")
    p.add_argument("--metadata-from", type=Path, default=None, help="carry this checkpoint's metadata instead of the "
                   "first input's (e.g. the run's own ema.safetensors, which records what its task adds: a DMD "
                   "generator's timesteps and teacher; training checkpoints hold only the run config and step)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        average_checkpoints(args.out, args.files, args.weights, DTYPES[args.dtype], args.metadata_from)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Noise-image pairs of a teacher's sampler, for the regression term of a distilled one-step generator (DMD's
regression loss, `dmd.regression_weight` with `dmd.pairs`; Yin et al. 2024, the first DMD paper).

    python tools/make_ode_pairs.py work/shapes/pairs.safetensors --config shapes_teacher --num 8000

For `--num` captions of the feature cache (data.cache_dir; a seeded random choice), the teacher (sample.checkpoint)
samples an image from noise with the config's sampler, steps and guidance (the learned null caption). The default
sampler of the shapes teacher, DPM-Solver++ 20 steps, is deterministic, so each image is a function of its noise:
the pairs are points of the teacher's guided probability-flow map. The file holds

    noise (N, C, h, w) f32   the starting noise (image i's from seed --seed + i, as the pipeline draws it)
    image (N, C, h, w) f32   the teacher's latent from that noise
    y (N, L, D) f32, mask (N, L) int8, index (N,) int64   the caption features and their cache index

with metadata naming the teacher (path, sha256), the sampler settings and the cache. Work is kept per batch in
OUT.parts/ (atomic files): an interrupted run (Ctrl-C) resumes where it stopped with the same command.
"""

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_path
from common.safetensors_file import save_file
from data.pairs import FORMAT

log = logging.getLogger("make_ode_pairs")

STOCHASTIC = ("lcm",)  # samplers that draw fresh noise: their image is not a function of the starting noise


def parse_args(argv=None):
    from configs.loader import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the pairs file to write (.safetensors)")
    add_config_arguments(p, default="shapes_teacher")
    p.add_argument("--num", type=int, default=8000, help="pairs to make (captions drawn from the cache)")
    p.add_argument("--seed", type=int, default=0, help="caption choice and noise seeds (image i: seed + i)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_pairs(args) -> Path:
    from configs import Config, load_config
    from data.features import FeatureDataset, batch_conditions, collate
    from models.checkpoint import load_checkpoint, peek
    from models.shipped import content_hash
    from pipeline.generate import check_prediction, check_sampler_options, denoise_batch, initial_noise

    if args.num < 1 or args.batch_size < 1:
        raise UserError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    if args.out.suffix != ".safetensors":
        raise UserError(f"the pairs file must end in .safetensors, got {str(args.out)!r}")
    cfg = load_config(Config, args.config, args.overrides)
    s = cfg.sample
    if s.sampler in STOCHASTIC:
        raise UserError(f"sample.sampler={s.sampler} draws fresh noise at every step, so its image is not a "
                        f"function of the starting noise: use a deterministic sampler (dpm, ddim)")
    check_sampler_options(s.sampler, s.sampler_options)
    if s.checkpoint is None:
        raise UserError("no teacher: set sample.checkpoint (--set sample.checkpoint=PATH)")
    info = peek(s.checkpoint)
    check_prediction(info, cfg.diffusion.prediction, s.checkpoint)
    dataset = FeatureDataset(cfg.data.cache_dir)
    if args.num > len(dataset):
        raise UserError(f"--num {args.num} is more than the {len(dataset)} captions of {cfg.data.cache_dir}")
    teacher, _, _ = load_checkpoint(s.checkpoint, cfg.model, device=s.device, dtype=torch.float32)
    teacher.eval()
    schedule = cfg.diffusion.build()
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.num].tolist()
    meta = {"format": FORMAT, "teacher": str(s.checkpoint), "teacher_sha256": content_hash(s.checkpoint),
            "sampler": s.sampler, "steps": str(s.steps), "guidance": str(s.guidance), "seed": str(args.seed),
            "cache_dir": str(cfg.data.cache_dir), "prediction": cfg.diffusion.prediction}
    parts = args.out.with_name(args.out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    starts = range(0, args.num, args.batch_size)
    for start in tqdm(starts, desc="pairs", unit="batch", disable=args.no_progress):
        part = parts / f"{start:08d}.safetensors"
        if part.exists():
            try:
                with safe_open(str(part), framework="pt") as f:
                    if f.metadata() == meta:
                        continue  # done by an earlier, interrupted run with the same settings
            except (OSError, SafetensorError):
                pass  # unreadable: made again
        indices = chosen[start:start + args.batch_size]
        batch = {k: v.to(s.device) if torch.is_tensor(v) else v
                 for k, v in collate([dataset[i] for i in indices]).items()}
        seeds = [args.seed + start + j for j in range(len(indices))]
        hw = tuple(batch["latent"].shape[-2:])
        with torch.no_grad():
            images = denoise_batch(teacher, schedule, replace(s, uncond="null"), batch_conditions(teacher, batch),
                                   seeds, hw, prediction=cfg.diffusion.prediction)
        noise = initial_noise(seeds, (teacher.in_channels, *hw), "cpu", torch.float32)
        if not torch.isfinite(images).all():
            raise UserError(f"the teacher's samples of batch {start} are not finite: check sample.checkpoint")
        with atomic_path(part) as tmp:
            save_file({"noise": noise, "image": images.float().cpu(), "y": batch["y"].float().cpu(),
                       "mask": batch["mask"].to(torch.int8).cpu(), "index": torch.tensor(indices)}, tmp, metadata=meta)
    shards = [load_file(str(parts / f"{start:08d}.safetensors")) for start in starts]
    tensors = {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
    with atomic_path(args.out) as tmp:
        save_file(tensors, tmp, metadata={**meta, "num": str(args.num)})
    for start in starts:
        (parts / f"{start:08d}.safetensors").unlink()
    parts.rmdir()
    return args.out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        out = make_pairs(args)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: finished batches are kept in %s.parts; run the same command to go on", args.out)
        return 130
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Pairs for the later steps of a few-step generator (`--start-timesteps 759,499,259`, the 4-step LCM student's; DPM
sampler only): for each such timestep s, each image is also re-noised to s with fresh noise and the teacher solves
the rest of its ODE from there, in round(steps * s / (T - 1)) steps. Those rows hold the re-noised latent as `noise`
and the teacher's image from it as `image`, and a `timestep` tensor (N,) int64 says where every row starts (T - 1
for the rows from pure noise). Each row's image is then a function of what that step of the student sees, so the
student can regress onto it (dmd.regression_steps: own); the image from the first noise is not (the re-noising
draws fresh noise), which is why regressing later steps onto it averages to blur. `--extend PAIRS` takes the rows
from noise of an existing pairs file of the same teacher and settings instead of sampling them again.

On-policy rows (`--student CKPT`, with --start-timesteps the student's later timesteps): the re-noised latent of
each later row is not the teacher's image re-noised but what the few-step student itself sees at that step when it
samples from the row's noise (its steps before, each output re-noised to the next timestep as the LCM sampler does),
and the teacher's ODE finishes from there. A student trained on them learns to finish as the teacher would from its
own states rather than from the teacher's, which its later steps never see (the hand-off of tools/handoff.py: the
teacher finishing from the student's state after one step keeps the teacher's kind). The metadata names the student.

    python tools/make_ode_pairs.py work/shapes/pairs4_onpolicy.safetensors --config shapes_teacher --batch-size 250 \
        --extend work/shapes/pairs.safetensors --start-timesteps 639,339,119 \
        --student weights/shapes/dmd4_student.safetensors
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
    p.add_argument("--start-timesteps", default="", help="comma-separated timesteps below T - 1: add rows that start "
                   "from each image re-noised to each of them (a few-step generator's later steps, e.g. 759,499,259)")
    p.add_argument("--extend", type=Path, default=None, help="a pairs file of the same teacher and settings: its "
                   "rows from noise are kept (not sampled again) and the --start-timesteps rows are added to them")
    p.add_argument("--student", type=Path, default=None, help="a few-step student at timesteps T - 1 and then "
                   "--start-timesteps: each later row starts from the student's own state at that timestep (on-policy "
                   "rows) instead of the teacher's image re-noised")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def parse_starts(text: str, num_train: int) -> list[int]:
    """The --start-timesteps list, each in 1..T - 2 (T - 1 is pure noise, the rows every file has)."""
    try:
        starts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--start-timesteps must be comma-separated integers, got {text!r}") from None
    bad = [t for t in starts if not 1 <= t <= num_train - 2]
    if bad or len(set(starts)) != len(starts):
        raise UserError(f"--start-timesteps must be distinct timesteps in 1..{num_train - 2} (below pure noise, "
                        f"{num_train - 1}), got {text!r}")
    return starts


def start_steps(steps: int, start: int, num_train: int) -> int:
    """Solver steps from timestep `start`: the full run's steps in proportion to the way left (at least 1)."""
    return max(1, round(steps * start / (num_train - 1)))


def read_extended(path: Path, meta: dict) -> dict:
    """The rows from noise of an existing pairs file, refused when it was made with other settings."""
    from data.pairs import load_pairs, read_pairs_metadata

    theirs = read_pairs_metadata(path)
    differ = [k for k in ("teacher_sha256", "sampler", "steps", "guidance", "seed", "cache_dir", "prediction")
              if theirs.get(k) != meta[k]]
    if differ:
        named = ", ".join(f"{k}: {theirs.get(k)!r} there, {meta[k]!r} here" for k in differ)
        raise UserError(f"--extend {path} was made with other settings ({named}): extend a pairs file of this "
                        f"teacher and sampler config")
    pairs = load_pairs(path)
    if "timestep" in pairs:
        raise UserError(f"--extend {path} already holds re-noised rows: extend the file of rows from noise")
    return pairs


def make_pairs(args) -> Path:
    from configs import Config, load_config
    from data.features import FeatureDataset, batch_conditions, collate
    from diffusion.samplers.dpm_solver import sample_dpm_solver
    from models.checkpoint import load_checkpoint, peek
    from models.shipped import content_hash
    from pipeline.generate import check_prediction, check_sampler_options, denoise_batch, guided_denoiser, initial_noise

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
    schedule = cfg.diffusion.build()
    starts_t = parse_starts(args.start_timesteps, schedule.num_steps)
    if starts_t and s.sampler != "dpm":
        raise UserError(f"--start-timesteps needs sample.sampler=dpm (it solves from a noised image), got "
                        f"{s.sampler}")
    if args.extend is not None and not starts_t:
        raise UserError("--extend adds re-noised rows to a pairs file: give --start-timesteps too")
    if args.student is not None and not starts_t:
        raise UserError("--student makes rows from the student's states at its later timesteps: give them as "
                        "--start-timesteps (e.g. 639,339,119 for a student at 999, 639, 339, 119)")
    if args.student is not None and not args.student.exists():
        raise UserError(f"--student {args.student}: no such checkpoint")
    if s.checkpoint is None:
        raise UserError("no teacher: set sample.checkpoint (--set sample.checkpoint=PATH)")
    info = peek(s.checkpoint)
    check_prediction(info, cfg.diffusion.prediction, s.checkpoint)
    dataset = FeatureDataset(cfg.data.cache_dir)
    meta = {"format": FORMAT, "teacher": str(s.checkpoint), "teacher_sha256": content_hash(s.checkpoint),
            "sampler": s.sampler, "steps": str(s.steps), "guidance": str(s.guidance), "seed": str(args.seed),
            "cache_dir": str(cfg.data.cache_dir), "prediction": cfg.diffusion.prediction}
    if starts_t:
        meta["start_timesteps"] = ",".join(map(str, starts_t))
        meta["start_steps"] = ",".join(str(start_steps(s.steps, t, schedule.num_steps)) for t in starts_t)
    student = None
    if args.student is not None:
        from diffusion.dmd import DistributionMatching

        student_model, _, _ = load_checkpoint(args.student, cfg.model, device=s.device, dtype=torch.float32)
        student = (student_model.eval(), DistributionMatching(schedule, cfg.diffusion.prediction, len(starts_t) + 1,
                                                              explicit_timesteps=[schedule.num_steps - 1, *starts_t]))
        meta.update(student=str(args.student), student_sha256=content_hash(args.student))
    extended = read_extended(args.extend, meta) if args.extend is not None else None
    if extended is not None:
        chosen = extended["index"].tolist()
        if max(chosen) >= len(dataset):
            raise UserError(f"--extend {args.extend} indexes captions past the {len(dataset)} of {cfg.data.cache_dir}")
    elif args.num > len(dataset):
        raise UserError(f"--num {args.num} is more than the {len(dataset)} captions of {cfg.data.cache_dir}")
    else:
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.num].tolist()
    num = len(chosen)  # --num, or the extended file's rows
    teacher, _, _ = load_checkpoint(s.checkpoint, cfg.model, device=s.device, dtype=torch.float32)
    teacher.eval()
    s = replace(s, uncond="null")
    parts = args.out.with_name(args.out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    batches = range(0, num, args.batch_size)
    for start in tqdm(batches, desc="pairs", unit="batch", disable=args.no_progress):
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
        cond = batch_conditions(teacher, batch)
        if extended is not None:
            noise = extended["noise"][start:start + args.batch_size]
            images = extended["image"][start:start + args.batch_size].to(s.device)
        else:
            with torch.no_grad():
                images = denoise_batch(teacher, schedule, s, cond, seeds, hw, prediction=cfg.diffusion.prediction)
            noise = initial_noise(seeds, (teacher.in_channels, *hw), "cpu", torch.float32)
        rows = {"noise": [noise], "image": [images.float().cpu()],
                "timestep": [torch.full((len(indices),), schedule.num_steps - 1)]}
        denoise = guided_denoiser(teacher, schedule, s, cond, prediction=cfg.diffusion.prediction)
        fresh = [initial_noise([seed + (k + 1) * 10_000_019 for seed in seeds], tuple(images.shape[1:]), s.device,
                               torch.float32) for k in range(len(starts_t))]
        if student is None:  # the teacher's image re-noised to each start
            starts_x = [schedule.q_sample(images.float(), torch.full((len(indices),), t, device=s.device), fresh[k])
                        for k, t in enumerate(starts_t)]
        else:  # the student's own state at each of its later steps (its input there), from the row's noise
            net, chain = student
            starts_x = chain.step_inputs(net, noise.to(s.device), cond, fresh)[1:]
        for t, x_t in zip(starts_t, starts_x):
            with torch.no_grad():
                solved = sample_dpm_solver(denoise, x_t, schedule, start_steps(s.steps, t, schedule.num_steps),
                                           start=t, **s.sampler_options)
            rows["noise"].append(x_t.cpu())
            rows["image"].append(solved.float().cpu())
            rows["timestep"].append(torch.full((len(indices),), t))
        copies = len(rows["noise"])
        tensors = {k: torch.cat(v) for k, v in rows.items()}
        if not torch.isfinite(tensors["image"]).all():
            raise UserError(f"the teacher's samples of batch {start} are not finite: check sample.checkpoint")
        tensors.update(y=batch["y"].float().cpu().repeat(copies, 1, 1),
                       mask=batch["mask"].to(torch.int8).cpu().repeat(copies, 1),
                       index=torch.tensor(indices).repeat(copies))
        if not starts_t:
            del tensors["timestep"]  # a file of rows from noise only, as before
        with atomic_path(part) as tmp:
            save_file(tensors, tmp, metadata=meta)
    shards = [load_file(str(parts / f"{start:08d}.safetensors")) for start in batches]
    tensors = {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
    with atomic_path(args.out) as tmp:
        save_file(tensors, tmp, metadata={**meta, "num": str(len(tensors["index"]))})
    for start in batches:
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

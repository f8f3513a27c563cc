"""Join noise-image pairs files of one teacher into one file, for a regression term on more pairs than one run of
tools/make_ode_pairs.py made (dmd.pairs takes one file).

    python tools/make_ode_pairs.py work/shapes/pairs_b.safetensors --config shapes_teacher --num 6000 --seed 6000
    python tools/make_ode_pairs.py work/shapes/pairs4_b.safetensors --config shapes_teacher --seed 6000 \\
        --extend work/shapes/pairs_b.safetensors --start-timesteps 759,499,259
    python tools/join_pairs.py work/shapes/pairs4_12k.safetensors work/shapes/pairs4.safetensors \\
        work/shapes/pairs4_b.safetensors

The files must come from the same teacher (sha256), sampler settings, feature cache and start timesteps, and from
--seed ranges that do not overlap (file i's images use noise seeds seed_i .. seed_i + num_i - 1: overlapping ranges
would repeat the same noise, so the same pair). The rows are concatenated in the order given; the metadata keeps
the shared settings, and `seed` lists every file's seed ("0,6000") with `joined` naming the files.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from common.errors import UserError
from common.files import atomic_path
from common.safetensors_file import save_file
from data.pairs import load_pairs, read_pairs_metadata

log = logging.getLogger("join_pairs")

SHARED = ("teacher", "teacher_sha256", "sampler", "steps", "guidance", "cache_dir", "prediction", "start_timesteps",
          "start_steps", "student", "student_sha256")  # the student: on-policy rows (make_ode_pairs.py --student)


def noise_rows(tensors: dict) -> int:
    """How many rows start from pure noise (each with its own seed)."""
    if "timestep" not in tensors:
        return len(tensors["index"])
    return int((tensors["timestep"] == tensors["timestep"].max()).sum())


def join_pairs(out: Path, files: list[Path]) -> Path:
    if len(files) < 2:
        raise UserError(f"give at least two pairs files to join, got {len(files)}")
    if out.suffix != ".safetensors":
        raise UserError(f"the joined file must end in .safetensors, got {str(out)!r}")
    if out.resolve() in [f.resolve() for f in files]:
        raise UserError(f"the joined file {out} is one of the inputs: write it elsewhere")
    metas = [read_pairs_metadata(f) for f in files]  # a missing or foreign file is named here
    for f, meta in zip(files[1:], metas[1:]):
        differ = [k for k in SHARED if meta.get(k) != metas[0].get(k)]
        if differ:
            named = ", ".join(f"{k}: {metas[0].get(k)!r} in {files[0]}, {meta.get(k)!r} in {f}" for k in differ)
            raise UserError(f"{f} was made with other settings than {files[0]} ({named}): join only pairs of one "
                            f"teacher, sampler config, cache, --start-timesteps and --student")
    if any("," in meta["seed"] for meta in metas):
        raise UserError("a joined file cannot be joined again: join the files it was made from")
    tensors = [load_pairs(f) for f in files]
    ranges = sorted((int(meta["seed"]), int(meta["seed"]) + noise_rows(t), f) for meta, t, f in
                    zip(metas, tensors, files))
    for (a0, a1, fa), (b0, b1, fb) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise UserError(f"{fa} (noise seeds {a0}..{a1 - 1}) and {fb} (seeds {b0}..{b1 - 1}) share noise seeds, so "
                            f"they hold the same pairs: make the second with --seed {a1} or above")
    shapes = [{k: tuple(v.shape[1:]) for k, v in t.items()} for t in tensors]
    for f, shape in zip(files[1:], shapes[1:]):
        if shape != shapes[0]:
            raise UserError(f"{f} holds rows of shapes {shape}, {files[0]} of {shapes[0]} (another latent size or "
                            f"caption length): join only pairs of one resolution and text encoder")
    joined = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}
    meta = {**{k: v for k, v in metas[0].items() if k in SHARED or k == "format"},
            "seed": ",".join(m["seed"] for m in metas), "num": str(len(joined["index"])),
            "joined": ",".join(str(f) for f in files)}
    with atomic_path(out) as tmp:
        save_file(joined, tmp, metadata=meta)
    log.info("wrote %s: %d rows from %d files", out, len(joined["index"]), len(files))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the joined pairs file to write (.safetensors)")
    p.add_argument("files", type=Path, nargs="+", help="pairs files of tools/make_ode_pairs.py, in this order")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        join_pairs(args.out, args.files)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

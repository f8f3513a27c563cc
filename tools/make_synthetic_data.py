"""Write the synthetic shapes data set: `python tools/make_synthetic_data.py OUT_DIR --num 1000 --seed 0`."""

import argparse
import logging
import re
import sys
from pathlib import Path

from data.synthetic import MIN_GAP, SceneSpec, write_dataset

logger = logging.getLogger("make_synthetic_data")
GENERATED = re.compile(r"^\d{6}\.(png|txt)$")  # names write_dataset produces at the top level


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse 'WxH,WxH' into (width, height) pairs, each side a positive multiple of 8."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if match is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not WIDTHxHEIGHT; use e.g. --sizes 256x256,192x320")
        width, height = int(match[1]), int(match[2])
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise argparse.ArgumentTypeError(
                f"{item!r}: width and height must be positive multiples of 8 (the VAE downsamples by 8); "
                f"use e.g. {max(8, width // 8 * 8)}x{max(8, height // 8 * 8)}")
        sizes.append((width, height))
    return sizes


def parse_weights(text: str) -> list[float]:
    """Parse '3,1,1' into non-negative floats."""
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 3,1,1") from None
    if any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: weights must be non-negative with a positive sum")
    return weights


def clear_generated(out_dir: Path):
    """Remove files a previous write_dataset run left in out_dir, and nothing else."""
    for path in list(out_dir.iterdir()) + list((out_dir / "edges").glob("*")):
        if path.is_file() and (GENERATED.match(path.name) or path.name in ("metadata.jsonl", "metadata.jsonl.tmp")):
            path.unlink()


def main(argv=None):
    """Parse arguments, check them and write the data set."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write (must be empty or missing unless --overwrite)")
    parser.add_argument("--num", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    parser.add_argument("--sizes", type=parse_sizes, default=[(256, 256)], help="WxH choices, comma separated")
    parser.add_argument("--max-objects", type=int, default=3, help="at most this many shapes per image")
    parser.add_argument("--object-weights", type=parse_weights, metavar="W1,W2,...",
                        help="relative frequency of 1, 2, ... shapes per image (one weight per count up to "
                             "--max-objects); default: uniform")
    parser.add_argument("--min-gap", type=float, default=MIN_GAP,
                        help="clearance between shapes' circumscribed circles, fraction of the shorter side")
    parser.add_argument("--cell-margin", type=float, default=0.0,
                        help="keep shape centres this far (fraction) from the 3x3 grid's borders, so that every "
                             "position word is unambiguous")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT_DIR, replacing old samples")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    try:
        scene = SceneSpec(args.max_objects, tuple(args.object_weights) if args.object_weights else None,
                          args.min_gap, args.cell_margin)
    except ValueError as e:
        parser.error(str(e))
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"OUT_DIR {args.out_dir} is a file; choose a folder path")
    if args.out_dir.is_dir() and any(args.out_dir.iterdir()):
        if not args.overwrite:
            parser.error(f"OUT_DIR {args.out_dir} exists and is not empty; pass --overwrite or choose a new folder")
        clear_generated(args.out_dir)

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s")
    logger.info("writing %d images to %s (seed %d, sizes %s, %s)", args.num, args.out_dir, args.seed, args.sizes,
                scene)
    write_dataset(args.out_dir, args.num, args.seed, args.sizes, scene, progress=not args.no_progress)


if __name__ == "__main__":
    main()

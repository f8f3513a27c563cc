"""Convert a PixArt transformer checkpoint between the official .pth, diffusers and this project's safetensors.

    python tools/convert_checkpoint.py PixArt-XL-2-512x512.pth out/pixart512 --to diffusers --config pixart_xl2_512
    python tools/convert_checkpoint.py out/pixart512 pixart512.safetensors --to safetensors

The source format is detected. The weights are checked against the architecture (from the file, from --config,
or read off the weights) before anything is written; every output is written under a temporary name first.
Converting A -> B -> A reproduces A bit for bit.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from configs import Config, ConfigError, add_config_arguments, load_config, to_yaml
from models.checkpoint import (
    FORMATS,
    NULL_CAPTION_KEY,
    CheckpointError,
    check_state_dict,
    read_checkpoint,
    save_checkpoint,
)
from models.pixart import build_pixart

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger("convert_checkpoint")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1000' -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for unit, mult in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official .pth/.safetensors, diffusers folder, or this project's .safetensors")
    parser.add_argument("dst", help="output file (official, safetensors) or folder (diffusers: DST/transformer/)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    parser.add_argument("--max-shard-size", type=parse_size, help="diffusers only: shard weights, e.g. 5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = load_config(Config, args.config, args.overrides) if args.config or args.overrides else None
        if args.print_config:
            print(to_yaml(cfg or Config()), end="")
            return 0
        convert(args, cfg.model if cfg else None)
    except (CheckpointError, ConfigError) as e:
        log.error("error: %s", e)
        return 2
    return 0


def convert(args, model_cfg) -> None:
    dst = Path(args.dst)
    if dst.exists() and args.to != "diffusers" and not args.overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    ckpt = read_checkpoint(args.src)
    cfg = model_cfg or ckpt.config
    if cfg is None:
        raise CheckpointError(f"{args.src} is an official checkpoint without a config (no {Path(args.src).stem}.yaml "
                              f"beside it): pass --config, e.g. --config pixart_xl2_512")
    sd = ckpt.state_dict
    check_state_dict(build_pixart(cfg, device="meta"), cfg, sd, args.src)
    if NULL_CAPTION_KEY not in sd:
        log.warning("%s has no null caption (y_embedding); the output will not have one either", args.src)
    if args.dtype:
        sd = {k: v.to(DTYPES[args.dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    out = save_checkpoint(sd, cfg, dst, args.to, max_shard_bytes=args.max_shard_size)
    log.info("%s (%s) -> %s (%s), %d tensors", args.src, ckpt.format, out, args.to, len(sd))


if __name__ == "__main__":
    sys.exit(main())

"""Generate images from text with a PixArt transformer.

    python sample/sample.py --config pixart_alpha_1024 --pipeline weights/PixArt-XL-2-1024-MS --prompt "a red fox"
    python sample/sample.py --config pixart_delta_lcm_1024 --pipeline weights/PixArt-LCM-XL-2-1024-MS \\
        --prompts-file prompts.txt --steps 4 --seed 7 --out outputs

Flags override the config file, which --set overrides first. Every check (sizes, sampler steps, files, latent
channels) runs before weights are loaded. Each run writes a numbered folder in --out holding one PNG per image
(prompt, seed, sampler and steps in the PNG text fields), grid.png (with several images), config.yaml, prompts.txt
and log.txt. Images are saved as their batches finish: Ctrl-C keeps those made so far and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from common.errors import UserError
from configs import Config, add_config_arguments, load_config, save_config, to_yaml

if TYPE_CHECKING:
    from pipeline.generate import Plan

# torch, transformers and diffusers load only once the arguments are parsed, so --help answers at once.

log = logging.getLogger("sample")
DEFAULT_CONFIG = "dmd_shapes_4step"  # the shipped four-step student: LCM 4 steps, no guidance; offline, on the CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default=DEFAULT_CONFIG)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", help="unconditional prompt (implies --set sample.uncond=negative)")
    p.add_argument("--pipeline", help="a diffusers pipeline folder: transformer, text encoder and VAE all from it")
    p.add_argument("--checkpoint", help="transformer weights: official .pth, diffusers folder or .safetensors")
    p.add_argument("--sampler", choices=["dpm", "lcm", "ddim"])
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--images-per-prompt", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--aspect-ratio", help="W:H, e.g. 16:9; picks width and height of about the model's base area")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--low-memory", action="store_true",
                   help="T5 in 8 bit and one-image VAE decoding (T5 is always freed before the transformer loads)")
    p.add_argument("--quantize", choices=["none", "int8", "fp8"],
                   help="8-bit transformer (int8: int8 weights and activations, CPU or CUDA; fp8: CUDA sm89+) and "
                        "int8 T5 weights; an int8 checkpoint file needs no flag (models/quantize.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer and VAE decoder (first call per size compiles; eager fallback)")
    p.add_argument("--out", help="output folder (a numbered run folder is made inside)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c = p.add_argument_group("ControlNet", "steer the image with a control map (models/controlnet.py)")
    c.add_argument("--control", help="control image: the map itself (edges, depth, ...) or, with --control-type, an "
                                     "image to extract it from; saved beside the result as control.png")
    c.add_argument("--control-type", choices=["none", "canny", "hed"],
                   help="extract the map on the fly (default none: the image is the map)")
    c.add_argument("--hed-weights", help="ControlNetHED.pth for --control-type hed (nothing is downloaded)")
    c.add_argument("--control-scale", type=float, help="conditioning scale of the branch's residuals (default 1)")
    c.add_argument("--control-checkpoint", help="the ControlNet branch (this project's file or an official .pth)")
    c.add_argument("--strict-control", action="store_true", help="refuse a control image of another size")
    return p.parse_args(argv)


def sampling_sets(args: argparse.Namespace) -> list[str]:
    """--sampler and --steps as --set entries after the user's, so that the defaults they decide are the flags':
    a preset whose generator trains at given timesteps samples them only at its own step count (e.g. the default
    four-step student with --steps 2 draws LCM's two timesteps, not its four)."""
    flags = {"sample.sampler": args.sampler, "sample.steps": args.steps}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """Command-line flags win over the config file and --set."""
    s = cfg.sample
    if args.pipeline:
        s.checkpoint = cfg.text_encoder.path = cfg.autoencoder.path = args.pipeline
    flags = dict(checkpoint=args.checkpoint, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                 seed=args.seed, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
                 width=args.width, height=args.height, device=args.device, dtype=args.dtype, out_dir=args.out)
    for name, value in flags.items():
        if value is not None:
            setattr(s, name, value)
    if args.negative_prompt is not None:
        s.negative_prompt, s.uncond = args.negative_prompt, "negative"
    if args.low_memory:
        s.low_memory = True
    if args.quantize is not None:
        s.quantize = args.quantize
    if args.compile:
        s.compile = True
    if args.aspect_ratio:
        s.aspect_ratio = args.aspect_ratio
    if args.control is not None:
        s.control = args.control
    if args.control_type is not None:
        s.control_type = args.control_type
    if args.hed_weights is not None:
        s.hed_weights = args.hed_weights
    if args.strict_control:
        s.strict_control = True
    if args.control_scale is not None:
        cfg.control.scale = args.control_scale
    if args.control_checkpoint is not None:
        cfg.control.checkpoint = args.control_checkpoint
    return cfg


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise UserError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    return prompts


def check_out_dir(out: Path) -> None:
    """The output folder can be made and written (checked before anything loads; nothing is created)."""
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; choose a folder for the numbered "
                        f"run folders")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable; choose a folder you can write to")


def next_run_dir(out: Path) -> Path:
    """out/00000, out/00001, ...: the next free number."""
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in out.iterdir() if p.is_dir() and p.name.isdigit()]
    run = out / f"{max(taken, default=-1) + 1:05d}"
    run.mkdir()
    return run


class RunWriter:
    """Writes a run's images as their batches finish (so Ctrl-C keeps the finished ones), then grid.png (when there
    are several images), prompts.txt and, with a control map, control.png."""

    def __init__(self, run: Path, cfg: Config, request: Plan):
        self.run, self.cfg, self.request = run, cfg, request
        self.images: list = []   # (3, H, W) tensors in [0, 1], in request order
        self.paths: list[Path] = []

    def add_batch(self, images, first: int) -> None:
        """Save images (n, 3, H, W) in [0, 1]: image i of the batch is image first + i of the request. A Ctrl-C
        while saving waits until the batch is written, so no image is half-written or left out of the count."""
        with signals_deferred(signal.SIGINT, signal.SIGTERM):
            self._save(images, first)

    def _save(self, images, first: int) -> None:
        s, request = self.cfg.sample, self.request
        for i, image in enumerate(images, first):
            prompt, seed = request.prompts[i], request.seeds[i]
            info = PngInfo()
            fields = dict(prompt=prompt, seed=seed, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                          uncond=s.uncond, negative_prompt=s.negative_prompt if s.uncond == "negative" else "",
                          checkpoint=s.checkpoint, size=f"{image.shape[2]}x{image.shape[1]}",
                          generated_at=f"{request.gen_size[1]}x{request.gen_size[0]}", dtype=s.dtype)
            for key, value in fields.items():
                info.add_text(key, str(value))
            path = self.run / f"{i:04d}_seed{seed}.png"
            to_pil(image).save(path, pnginfo=info)
            self.images.append(image)
            self.paths.append(path)

    def finish(self) -> None:
        """grid.png (several images), prompts.txt of the images written, control.png."""
        n = len(self.images)
        if self.cfg.sample.grid and n > 1:
            from torchvision.utils import make_grid

            to_pil(make_grid(self.images, nrow=math.ceil(math.sqrt(n)), padding=2)).save(self.run / "grid.png")
        (self.run / "prompts.txt").write_text("".join(f"{seed}\t{p}\n" for p, seed in
                                                      zip(self.request.prompts[:n], self.request.seeds[:n])))
        if self.request.control is not None and self.request.control.ndim == 3:  # the map, at the generated size
            to_pil((self.request.control + 1) / 2).save(self.run / "control.png")


@contextlib.contextmanager
def signals_deferred(*signals):
    """Signals that arrive inside the block are delivered when it ends (where the platform can block them)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def to_pil(image) -> Image.Image:
    """(3, H, W) float in [0, 1] -> 8-bit RGB."""
    return Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        cfg = apply_flags(load_config(Config, args.config, args.overrides + sampling_sets(args)), args)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from pipeline.generate import plan

        request = plan(cfg, read_prompts(args))
        check_out_dir(Path(cfg.sample.out_dir))
    except UserError as e:
        log.error("error: %s", e)
        return 2
    run = next_run_dir(Path(cfg.sample.out_dir))  # only now, with every check passed
    save_config(cfg, run / "config.yaml")
    handler = logging.FileHandler(run / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    h, w = request.gen_size
    log.info("%d images, %s %d steps, guidance %s, generating at %dx%d (WxH) -> %s", len(request.prompts),
             cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance, w, h, run)
    import torch

    writer = RunWriter(run, cfg, request)
    try:
        from pipeline.generate import generate

        result = generate(cfg, request, progress=not args.no_progress, on_batch=writer.add_batch)
    except UserError as e:
        writer.finish()
        log.error("error: %s (the run folder %s keeps config.yaml, log.txt and the %d images made before)", e, run,
                  len(writer.paths))
        return 2
    except torch.OutOfMemoryError:
        writer.finish()
        s = cfg.sample
        log.error("error: out of %s memory generating %d image(s) of %dx%d in batches of %d: pass a smaller "
                  "--batch-size%s%s (the run folder %s keeps config.yaml, log.txt and the %d images made before)",
                  s.device, len(request.prompts), w, h, s.batch_size,
                  "" if s.low_memory else ", --low-memory (8-bit T5, one-image VAE decoding)",
                  "" if s.quantize != "none" else ", --quantize int8", run, len(writer.paths))
        return 2
    except KeyboardInterrupt:
        writer.finish()
        log.warning("interrupted (Ctrl-C): kept the %d of %d images finished before it in %s", len(writer.paths),
                    len(request.prompts), run)
        return 130
    writer.finish()
    t = result.timings
    log.info("wrote %d images to %s (text %.2fs, loading %.2fs, denoising %.2fs, VAE %.2fs)", len(writer.paths), run,
             t.text_encoding, t.loading, t.denoising, t.vae_decoding)
    return 0

if __name__ == "__main__":
    sys.exit(main())

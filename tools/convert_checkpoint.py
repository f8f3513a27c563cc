"""Convert a PixArt transformer checkpoint between the official .pth, diffusers and this project's safetensors, or
assemble a whole diffusers pipeline folder around it.

    python tools/convert_checkpoint.py PixArt-XL-2-512x512.pth out/pixart512 --to diffusers --config pixart_xl2_512
    python tools/convert_checkpoint.py out/pixart512 pixart512.safetensors --to safetensors
    python tools/convert_checkpoint.py student.safetensors out/student-pipeline --to pipeline --scheduler lcm \
        --text-encoder weights/PixArt-XL-2-1024-MS --vae weights/PixArt-XL-2-1024-MS

A pipeline folder needs a latent-space model and a VAE of its latent channels; a pixel-space model (the shipped
shapes models) exports its transformer alone (--to diffusers or --to safetensors), as diffusers' pipeline always
decodes with a VAE.

ControlNet: an official PixArt-XL-2-*-ControlNet.pth (base_model.* + controlnet.*) splits into the base as this
project's safetensors and the branch alone (recording the base's hash); a branch plus its base join back into
the official layout:

    python tools/convert_checkpoint.py PixArt-XL-2-512-ControlNet.pth out/cn512 --to control --config pixart_xl2_512
    python tools/convert_checkpoint.py out/cn512/control.safetensors cn512.pth --to official \
        --base out/cn512/base.safetensors

A training checkpoint (a run's checkpoints/step_*.pt) gives the weights of that step: its EMA, or with
--weights model the raw training weights (to evaluate or ship an intermediate step of a run):

    python tools/convert_checkpoint.py runs/00001-x/checkpoints/step_00004000.pt x-4000.safetensors --to safetensors

The source format is detected. The weights are checked against the architecture (from the file, from --config,
or read off the weights) before anything is written; every output is written under a temporary name first.
Converting A -> B -> A reproduces A bit for bit.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from common.errors import CheckpointError, UserError
from common.files import atomic_dir
from configs import Config, add_config_arguments, load_config, to_yaml
from engine.state import is_training_state, read_training_state
from models.autoencoder import resolve_vae
from models.checkpoint import FORMATS, NULL_CAPTION_KEY, check_state_dict, read_checkpoint, save_checkpoint
from models.pipeline_folder import scheduler_config, write_pipeline_folder
from models.pixart import build_pixart
from models.text_encoder import resolve_text_encoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUTS = (*FORMATS, "pipeline", "control")
SUFFIXES = {"official": (".pth", ".pt", ".bin", ".ckpt"), "safetensors": (".safetensors",)}
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
    parser.add_argument("--to", required=True, choices=OUTPUTS, help="output format (pipeline: a whole "
                        "diffusers PixArtAlphaPipeline folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    parser.add_argument("--max-shard-size", type=parse_size, help="diffusers only: shard weights, e.g. 5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")
    parser.add_argument("--scheduler", choices=("lcm", "dpm"), default="lcm",
                        help="pipeline only: LCMScheduler (a distilled student) or DPMSolverMultistep (a teacher)")
    parser.add_argument("--text-encoder", help="pipeline only: a T5 folder or pipeline root (text_encoder/, "
                                               "tokenizer/) to copy in")
    parser.add_argument("--vae", help="pipeline only: an AutoencoderKL folder or pipeline root (vae/) to copy in")
    parser.add_argument("--weights", choices=("ema", "model"),
                        help="a training checkpoint (step_*.pt) as source: its EMA (default) or raw training weights")
    parser.add_argument("--base", help="a ControlNet branch to --to official: its base model (any format)")
    parser.add_argument("--quantize", choices=("none", "int8", "int8-weights"), default="none",
                        help="--to safetensors only: store the transformer blocks' linear weights as int8 with "
                             "per-row scales (a quarter of fp32); int8 loads as int8 layers without re-quantising, "
                             "int8-weights is storage only and loads as float weights (models/quantize.py)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = load_config(Config, args.config, args.overrides) if args.config or args.overrides else None
        if args.print_config:
            print(to_yaml(cfg or Config()), end="")
            return 0
        convert(args, cfg)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    return 0


def check_destination(fmt: str, dst: Path, overwrite: bool) -> None:
    """Refuse a destination that would be misnamed or would replace something without --overwrite."""
    if fmt in SUFFIXES and dst.suffix not in SUFFIXES[fmt]:
        right = dst.with_suffix(SUFFIXES[fmt][0]).name
        raise CheckpointError(f"{dst} does not look like a{'n official' if fmt == 'official' else ' safetensors'} "
                              f"file ({fmt} files end in {', '.join(SUFFIXES[fmt])}): name it e.g. {right}"
                              + (", or use --to safetensors" if dst.suffix == ".safetensors" else ""))
    existing = {"diffusers": dst / "transformer", "pipeline": dst / "model_index.json"}.get(fmt, dst)
    if existing.exists() and not overwrite:
        raise CheckpointError(f"{existing} already exists; pass --overwrite to replace it")
    if fmt in ("diffusers", "pipeline") and dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file; the {fmt} output is a folder")


def prediction_of(ckpt, cfg) -> str:
    """The prediction type a checkpoint was trained with: --config's, else the run config in its metadata."""
    if cfg is not None:
        return cfg.diffusion.prediction
    text = ckpt.metadata.get("config")
    return (yaml.safe_load(text) or {}).get("diffusion", {}).get("prediction", "eps") if text else "eps"


def autoencoder_kind_of(ckpt, cfg) -> str:
    """The autoencoder a checkpoint was trained with ("pixel", "sd-vae"): --config's, else its recorded run config."""
    if cfg is not None:
        return cfg.autoencoder.kind
    text = ckpt.metadata.get("config")
    return ((yaml.safe_load(text) or {}).get("autoencoder") or {}).get("kind", "sd-vae") if text else "sd-vae"


def check_pipeline_autoencoder(src, ckpt, run_cfg, model_cfg, vae: str, vae_channels: int) -> None:
    """A pipeline folder decodes the transformer's latents with --vae: a pixel-space model cannot be one, and the
    VAE's latent channels must be the model's."""
    if autoencoder_kind_of(ckpt, run_cfg) == "pixel":
        raise CheckpointError(f"{src} is a pixel-space model (it draws RGB pixels, no autoencoder), and "
                              f"diffusers' PixArtAlphaPipeline always decodes with an AutoencoderKL, so it cannot be "
                              f"exported as a pipeline folder: export the transformer alone with --to diffusers "
                              f"(PixArtTransformer2DModel) or --to safetensors, and sample it with sample/sample.py")
    if vae_channels != model_cfg.in_channels:
        raise CheckpointError(f"the VAE {vae} makes {vae_channels}-channel latents but the transformer {src} takes "
                              f"{model_cfg.in_channels} (model.in_channels): the pipeline would fail at its first "
                              f"step; pass the VAE the model was trained with")


def is_control_file(path: Path) -> bool:
    """A ControlNet file: this project's branch (safetensors metadata) or an official base_model.* + controlnet.*."""
    from models.controlnet import FORMAT

    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("format") == FORMAT
        except Exception:
            return False
    if path.suffix in SUFFIXES["official"] and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return False
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return any(str(k).startswith("controlnet.") for k in state)
    return False


def convert_control(args, run_cfg) -> None:
    """Official ControlNet .pth -> DST/base.safetensors + DST/control.safetensors, or branch + --base -> .pth."""
    from models.checkpoint import load_checkpoint
    from models.controlnet import (
        ControlConfig,
        branch_design,
        join_official,
        load_branch,
        read_branch,
        save_branch,
    )
    from models.shipped import content_hash

    src, dst = Path(args.src), Path(args.dst)
    if args.to == "control":
        branch_state, _, base_state = read_branch(src)
        if base_state is None:
            raise CheckpointError(f"{src} is already a branch of this project; --to control splits an official "
                                  f"ControlNet .pth (base_model.* + controlnet.*)")
        if dst.exists() and not args.overwrite:
            raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
        cfg = run_cfg.model if run_cfg is not None else None
        if cfg is None:
            raise CheckpointError(f"{src} carries no model config: pass --config, e.g. --config pixart_xl2_512")
        check_state_dict(build_pixart(cfg, device="meta"), cfg, base_state, f"{src} (base_model.*)")
        base_path = save_checkpoint(base_state, cfg, dst / "base.safetensors", "safetensors",
                                    overwrite=args.overwrite)
        base, _, _ = load_checkpoint(base_path)
        design, n = branch_design(src)
        branch = load_branch(src, base, ControlConfig(design=design, num_blocks=n))
        save_branch(branch, base, dst / "control.safetensors", content_hash(base_path))
        log.info("%s -> %s (base) + %s (branch: %s, N = %d)", src, base_path, dst / "control.safetensors", design, n)
        return
    if args.to != "official" or not args.base:
        raise CheckpointError(f"{src} is a ControlNet branch: convert it with --to official --base BASE (the official "
                              f"layout holds base and branch together)")
    check_destination("official", dst, args.overwrite)
    base, base_cfg, _ = load_checkpoint(args.base)
    design, n = branch_design(src)
    branch = load_branch(src, base, ControlConfig(design=design, num_blocks=n), content_hash(args.base))
    if design != "transformer":
        raise CheckpointError(f"{src} is a {design} branch; the official layout holds ControlNet-Transformers only")
    from common.files import atomic_path

    with atomic_path(dst) as tmp:
        torch.save(join_official(base.state_dict(), branch.state_dict()), tmp)
    log.info("%s + %s -> %s (official ControlNet layout, N = %d)", src, args.base, dst, n)


def convert(args, run_cfg) -> None:
    dst = Path(args.dst)
    if args.to == "control" or is_control_file(Path(args.src)):
        return convert_control(args, run_cfg)
    check_destination(args.to, dst, args.overwrite)
    if args.to == "pipeline" and not (args.text_encoder and args.vae):
        raise CheckpointError("--to pipeline needs --text-encoder PATH and --vae PATH (the pipeline's other parts)")
    if args.quantize != "none" and args.to != "safetensors":
        raise CheckpointError(f"--quantize {args.quantize} writes this project's safetensors: pass --to safetensors "
                              f"(official and diffusers files hold float weights)")
    if is_training_state(args.src):
        ckpt = read_training_state(args.src, args.weights or "ema")
    elif args.weights:
        raise CheckpointError(f"--weights {args.weights} picks the weights of a training checkpoint (step_*.pt); "
                              f"{args.src} holds one set of weights: leave --weights out")
    else:
        ckpt = read_checkpoint(args.src)
    if ckpt.metadata.get("quantization"):
        raise CheckpointError(f"{args.src} is a {ckpt.metadata['quantization']} checkpoint: quantised weights convert "
                              f"no further (the float values are gone); convert the float checkpoint it came from")
    cfg = run_cfg.model if run_cfg is not None else ckpt.config
    if cfg is None:
        raise CheckpointError(f"{args.src} is an official checkpoint without a config (no {Path(args.src).stem}.yaml "
                              f"beside it): pass --config, e.g. --config pixart_xl2_512")
    sd = ckpt.state_dict
    check_state_dict(build_pixart(cfg, device="meta"), cfg, sd, args.src)
    if NULL_CAPTION_KEY not in sd:
        log.warning("%s has no null caption (y_embedding); the output will not have one either", args.src)
    if args.dtype:
        sd = {k: v.to(DTYPES[args.dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    if args.to == "pipeline":
        text_dir, tok_dir = resolve_text_encoder(args.text_encoder)
        vae_dir, vae_config = resolve_vae(args.vae)
        check_pipeline_autoencoder(args.src, ckpt, run_cfg, cfg, args.vae, int(vae_config.get("latent_channels", 4)))
        with atomic_dir(dst, replace_existing=args.overwrite) as tmp:
            write_pipeline_folder(tmp, sd, cfg, text_dir, tok_dir, vae_dir,
                                  scheduler_config(args.scheduler, prediction_of(ckpt, run_cfg)))
        out = dst
    else:
        if args.quantize != "none":
            sd = quantize_state_dict(sd, cfg, args.quantize)
        # The run config a trainer recorded (prediction type, ...) travels with the weights.
        keep = ("config", "step") if ckpt.format == "training-state" else ("config",)
        metadata = {k: ckpt.metadata[k] for k in keep if k in ckpt.metadata} if args.to == "safetensors" else None
        if args.quantize != "none":
            metadata["quantization"] = args.quantize
        out = save_checkpoint(sd, cfg, dst, args.to, metadata=metadata, max_shard_bytes=args.max_shard_size,
                              overwrite=args.overwrite)
    log.info("%s (%s) -> %s (%s), %d tensors", args.src, ckpt.format, out, args.to, len(sd))


def quantize_state_dict(sd: dict[str, torch.Tensor], cfg, mode: str) -> dict[str, torch.Tensor]:
    """Official-key float weights -> the same keys with the block linear weights as int8 (+ `<key>_scale`): as
    torchao's int8 layers hold them (int8), or rounded per row for storage only (int8-weights)."""
    from models.quantize import quantize_transformer, quantized_state_dict, store_int8_weights

    model = build_pixart(cfg, device="meta")
    if mode == "int8-weights":
        return store_int8_weights(sd, model)
    float_sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k != "pos_embed"}
    model.load_state_dict(float_sd, strict=False, assign=True)  # only a missing null caption stays unassigned
    quantized = quantized_state_dict(quantize_transformer(model.eval(), mode))
    # the layers left in float keep the file's dtype
    return {k: v if k.endswith("_scale") or v.dtype == torch.int8 else sd[k] for k, v in quantized.items()
            if k in float_sd or k.endswith("_scale")}


if __name__ == "__main__":
    sys.exit(main())

"""Read, check and write PixArt transformer weights in the three formats people have; one module per format in
models/formats/:

- "official": the PixArt-alpha / -Sigma repositories' .pth (weights under "state_dict" or bare, pos_embed optional).
- "diffusers": a folder with transformer/config.json + diffusion_pytorch_model.safetensors (or shards).
- "safetensors": this project's own file, official key names, the PixArtConfig in the metadata.

Every reader returns official key names, which are this project's module names, so a load is one
`load_state_dict(assign=True)` into a model built on the meta device (no second copy of the weights in RAM).
What the weights say about their variant (models/variants.py) turns a mismatch into a message naming the preset.
"""

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.errors import CheckpointError
from common.files import TRAIN_STATE_FORMAT, training_state_message
from models.embeddings import sincos_pos_embed_2d
from models.formats.diffusers import (
    NULL_CAPTION_FILE,
    NULL_CAPTION_KEY,
    diffusers_dir,
    diffusers_folder_config,
    num_blocks,
    read_diffusers_dir,
    read_diffusers_file,
    write_diffusers,
)
from models.formats.official import read_official, read_sidecar_config, write_official
from models.formats.safetensors import (
    FORMAT_TAG,
    config_from_json,
    read_safetensors,
    safetensors_header,
    write_safetensors,
)
from models.pixart import PixArt, build_pixart
from models.shipped import ShippedWeightsError, verify_shipped
from models.variants import PixArtConfig, family_mismatch

__all__ = [
    "FORMATS", "NULL_CAPTION_KEY", "Checkpoint", "CheckpointError", "CheckpointInfo", "LoadReport", "check_state_dict",
    "describe_mismatch", "detect_format", "infer_config", "load_checkpoint", "peek", "peek_config", "read_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMATS = ("official", "diffusers", "safetensors")


@dataclass
class Checkpoint:
    """Weights in official key names, plus what the file said about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str
    path: Path
    config: PixArtConfig | None = None           # from the file when it carries one (diffusers, safetensors)
    metadata: dict[str, str] = field(default_factory=dict)
    caption_tokens_known: bool = True  # see CheckpointInfo


# ----------------------------------------------------------------------------------------------------------
# What a state dict looks like


def other_model_kind(keys) -> str | None:
    """Name the kind of model a non-PixArt state dict belongs to, if recognisable."""
    keys = list(keys)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if any(k.startswith("controlnet.") for k in keys) or any(k.startswith("base_model.") for k in keys):
        return "a PixArt ControlNet checkpoint (base_model.* / controlnet.* keys), not a plain transformer"
    if has("encoder.block.") and has("SelfAttention"):
        return "a T5 text-encoder checkpoint, not a PixArt transformer"
    if has("decoder.up_blocks") or has("decoder.up.") or has("quant_conv"):
        return "a VAE checkpoint, not a PixArt transformer"
    if has("model.diffusion_model.") or has("down_blocks.") or has("input_blocks."):
        return "a UNet (Stable Diffusion-style) checkpoint, not a PixArt transformer"
    return None


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture fields that can be read off official-key weights (num_heads cannot)."""
    out = {}
    if "x_embedder.proj.weight" in sd:
        hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
        out.update(hidden_size=hidden, in_channels=in_ch, patch_size=p)
        if "final_layer.linear.weight" in sd:
            out["learn_sigma"] = sd["final_layer.linear.weight"].shape[0] // (p * p) == 2 * in_ch
    out["depth"] = num_blocks(sd, "blocks.")
    if "blocks.0.mlp.fc1.weight" in sd and "hidden_size" in out:
        out["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / out["hidden_size"]
    if "y_embedder.y_proj.fc1.weight" in sd:
        out["caption_channels"] = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    if NULL_CAPTION_KEY in sd:
        out["caption_tokens"] = sd[NULL_CAPTION_KEY].shape[0]
    out["micro_conditions"] = "csize_embedder.mlp.0.weight" in sd
    out["guidance_embedding"] = "w_embedder.proj.weight" in sd
    if "pos_embed" in sd and "hidden_size" in out and "patch_size" in out:
        out.update(_infer_pos_embed(sd["pos_embed"], out["hidden_size"], out["patch_size"]))
    return out


def _infer_pos_embed(pos: torch.Tensor, hidden: int, patch: int) -> dict:
    """latent_size and pe_interpolation that reproduce a stored square pos_embed buffer, when one does."""
    tokens = pos.shape[-2]
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        return {}
    out = {"latent_size": grid * patch}
    for scale in (0.5, 1.0, 2.0, 4.0, 0.25, 1.5, 3.0):
        ref = sincos_pos_embed_2d(hidden, grid, grid, grid, scale)
        if torch.allclose(pos.reshape(tokens, -1).float(), ref, atol=1e-4):
            out["pe_interpolation"] = scale
            break
    return out


def describe_mismatch(cfg: PixArtConfig, sd: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable reasons why weights `sd` do not fit `cfg`, each with the fix."""
    kind = other_model_kind(sd.keys())
    if kind:
        return [f"this looks like {kind}"]
    seen, want = infer_config(sd), asdict(cfg.resolved())
    hints = []
    family = family_mismatch(cfg, seen)
    if family:
        hints.append(family)
    if seen.get("micro_conditions") and not cfg.micro_conditions:
        hints.append("the checkpoint is multi-scale (MS: has csize/ar embedders) but the config is not: "
                     "use configs/pixart_xl2_1024_ms.yaml or --set model.micro_conditions=true")
    if not seen.get("micro_conditions") and cfg.micro_conditions and seen.get("depth"):
        hints.append("the config is multi-scale (MS) but the checkpoint has no csize/ar embedders: "
                     "use a 256/512 config or --set model.micro_conditions=false")
    for name, value in seen.items():
        if name == "micro_conditions" or want.get(name) == value:
            continue
        if name in ("latent_size", "pe_interpolation"):  # only a hint: the grid is recomputed anyway
            continue
        hints.append(f"the checkpoint has {name}={value}, the config {name}={want.get(name)}: "
                     f"--set model.{name}={value}")
    if seen.get("pe_interpolation") not in (None, cfg.pe_interpolation):
        hints.append(f"the checkpoint's pos_embed was made with pe_interpolation={seen['pe_interpolation']} "
                     f"(latent_size {seen.get('latent_size')}), the config has {cfg.pe_interpolation}")
    return hints


# ----------------------------------------------------------------------------------------------------------
# Reading


def detect_format(path: str | os.PathLike) -> str:
    """'official', 'diffusers' or 'safetensors', from the path and the file's keys/metadata."""
    path = Path(path)
    try:
        verify_shipped(path)  # weights that live in the repository: present and unchanged
    except ShippedWeightsError as e:
        raise CheckpointError(str(e)) from e
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        diffusers_dir(path)  # raises if the folder is not a diffusers transformer
        return "diffusers"
    if path.suffix == ".safetensors":
        keys, meta = safetensors_header(path)
        if meta.get("format") == FORMAT_TAG:
            return "safetensors"
        return "diffusers" if any(k.startswith("transformer_blocks.") for k in keys) else "official"
    return "official"


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint into official key names."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        _, meta = safetensors_header(path)
        cfg = config_from_json(meta["model_config"], path) if "model_config" in meta else None
        return Checkpoint(read_safetensors(path), fmt, path, cfg, meta)
    if fmt == "official":
        sd = read_safetensors(path) if path.suffix == ".safetensors" else read_official(path)
        return Checkpoint(sd, fmt, path, read_sidecar_config(path))
    if path.is_file():  # a bare diffusers-key safetensors file without config.json
        return Checkpoint(read_diffusers_file(path), fmt, path)
    sd, cfg, known = read_diffusers_dir(diffusers_dir(path))
    return Checkpoint(sd, fmt, path, cfg, caption_tokens_known=known)


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read without its weights."""

    config: PixArtConfig | None      # None: an official file without a config beside it
    null_caption: bool | None        # whether it holds the learned null caption; None: unknown until loaded
    metadata: dict[str, str]         # this project's safetensors metadata (run config, step, ...)
    caption_tokens_known: bool = True  # False: a diffusers transformer folder alone, without null caption or
                                       # model_index.json, does not say its caption length (the run config does)
    seen: dict = field(default_factory=dict)  # what an official file's weights show (infer_config), read memory-mapped


def peek(path: str | os.PathLike) -> CheckpointInfo:
    """Config, null caption and metadata of a checkpoint, reading no weights; a training-state file is an error.

    For checks before heavy loading, e.g. the transformer's latent channels against the autoencoder's.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        keys, meta = safetensors_header(path)
        return CheckpointInfo(config_from_json(meta["model_config"], path), NULL_CAPTION_KEY in keys, meta)
    if fmt == "diffusers" and path.is_dir():
        folder = diffusers_dir(path)
        cfg, known = diffusers_folder_config(folder)
        return CheckpointInfo(cfg, (folder / NULL_CAPTION_FILE).is_file(), {}, known)
    if fmt == "official" and path.suffix != ".safetensors":
        obj = None
        with contextlib.suppress(Exception):  # unreadable files are reported by the loader with their reason
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT:
            raise CheckpointError(training_state_message(path))
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            seen = infer_config(sd)  # shapes only: the family (caption length) and grid of a config-less file
            return CheckpointInfo(read_sidecar_config(path), NULL_CAPTION_KEY in sd, {}, seen=seen)
    return CheckpointInfo(read_sidecar_config(path) if fmt == "official" else None, None, {})


def peek_config(path: str | os.PathLike) -> PixArtConfig | None:
    """The architecture a checkpoint declares, reading no weights (None: an official file without a config)."""
    return peek(path).config


# ----------------------------------------------------------------------------------------------------------
# Loading into a model


@dataclass
class LoadReport:
    """What a load found besides the weights it assigned."""

    format: str
    null_caption: bool = True  # False when the file had no y_embedding (plain diffusers): null-caption CFG is off
    quantization: str = "none"  # int8: the block linear layers hold int8 weights; int8-weights: stored so, now float


def check_state_dict(
    model: PixArt, cfg: PixArtConfig, sd: dict[str, torch.Tensor], source: str, optional=(NULL_CAPTION_KEY,)
) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches, with a diagnosis."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd) - set(optional))
    unexpected = sorted(set(sd) - set(expected) - {"pos_embed"})  # pos_embed: derived, recomputed per grid
    mismatched = [(k, tuple(sd[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model config"]
        lines += [f"  hint: {h}" for h in describe_mismatch(cfg, sd)]
        lines += _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
        lines += _listing("shape mismatches", [f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched])
        raise CheckpointError("\n".join(lines))


def _listing(title: str, items: list, limit: int = 12) -> list[str]:
    if not items:
        return []
    more = [f"    ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"  {title} ({len(items)}):"] + [f"    {i}" for i in items[:limit]] + more


def load_checkpoint(
    path: str | os.PathLike,
    cfg: PixArtConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PixArt, PixArtConfig, LoadReport]:
    """Build the model on the meta device and assign the weights of any supported checkpoint into it.

    cfg: the expected architecture. None takes it from the file (diffusers, this project's safetensors); an
    official .pth carries none, so its config is then inferred from the weights (heads = hidden / 72).
    Returns (model in eval mode, the config used, report).
    """
    ckpt = read_checkpoint(path)
    sd = ckpt.state_dict
    cfg = cfg or ckpt.config or _config_from_official(sd, ckpt.path)
    report = LoadReport(format=ckpt.format, null_caption=NULL_CAPTION_KEY in sd,
                        quantization=ckpt.metadata.get("quantization", "none"))
    quantized = {}
    if report.quantization != "none":  # int8 values + per-row scales, installed as they are (models/quantize.py)
        from models.quantize import FILE_MODES, split_quantized

        if report.quantization not in FILE_MODES:
            raise CheckpointError(f"{path} is quantised as {report.quantization!r}, which this version cannot read "
                                  f"(it reads {', '.join(FILE_MODES)})")
        sd, quantized = split_quantized(sd)
    model = build_pixart(cfg, device="meta")
    check_state_dict(model, cfg, {**sd, **{k: q for k, (q, _) in quantized.items()}}, str(path))
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}
    if report.quantization == "int8-weights":  # a storage format: the model computes in float (models/quantize.py)
        from models.quantize import load_int8_weights

        stored_dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
        sd, quantized = load_int8_weights(sd, quantized, stored_dtype), {}
    if not report.null_caption:
        # Plain diffusers folders drop the null caption. Keep the weights usable, with CFG from a negative prompt.
        log.debug("%s has no null caption (y_embedding): guidance needs an encoded negative prompt; the buffer is "
                  "zeros", path)
        sd[NULL_CAPTION_KEY] = torch.zeros(cfg.caption_tokens, cfg.caption_channels)
    if not quantized:
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval(), cfg, report
    from models.quantize import assign_int8

    dtype = dtype or torch.float32
    assign_int8(model, quantized, device, dtype)
    model.load_state_dict({k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()},
                          strict=False, assign=True)
    return model.eval(), cfg, report


def _config_from_official(sd: dict[str, torch.Tensor], path: Path) -> PixArtConfig:
    """Best-effort config for a config-less official file; heads assume the PixArt head width of 72."""
    kind = other_model_kind(sd.keys())
    if kind:
        raise CheckpointError(f"{path}: this looks like {kind}")
    seen = infer_config(sd)
    if "hidden_size" not in seen or seen["hidden_size"] % 72:
        raise CheckpointError(f"{path} carries no config and its architecture cannot be read off its weights; "
                              f"pass a config (--config / cfg=)")
    seen["num_heads"] = seen["hidden_size"] // 72
    if "pe_interpolation" not in seen:
        log.warning("%s carries no pos_embed: latent_size/pe_interpolation default to %s/%s; pass a config "
                    "if this is not a 256px model", path, PixArtConfig.latent_size, PixArtConfig.pe_interpolation)
    return PixArtConfig(**seen)


# ----------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    sd: dict[str, torch.Tensor],
    cfg: PixArtConfig,
    path: str | os.PathLike,
    fmt: str,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write official-key weights `sd` as `fmt`; every file (and the diffusers transformer/ folder) is written under
    a temporary name, then renamed; overwrite replaces an existing diffusers transformer/ folder."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
    cfg = cfg.resolved()
    sd = {k: v.detach().contiguous() for k, v in sd.items() if k != "pos_embed"}
    path = Path(path)
    int8 = any(v.dtype == torch.int8 for v in sd.values())  # from models.quantize.quantized_state_dict
    if int8 and fmt != "safetensors":
        raise CheckpointError(f"int8 weights are saved as this project's safetensors only, not {fmt}: save the float "
                              f"weights as {fmt}, or pass --to safetensors")
    if fmt == "safetensors":
        write_safetensors(sd, cfg, path, metadata, int8)
    elif fmt == "official":
        write_official(sd, cfg, path)
    else:
        write_diffusers(sd, cfg, path, max_shard_bytes, overwrite)
    return path


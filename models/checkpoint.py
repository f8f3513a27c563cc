"""Read, check and write PixArt transformer weights in the three formats people have.

- "official": the PixArt-alpha repository's .pth (weights under "state_dict" or bare, pos_embed buffer optional).
- "diffusers": a folder with transformer/config.json + diffusion_pytorch_model.safetensors (or shards).
  diffusers does not store the null caption; this project writes it beside the weights as null_caption.safetensors.
- "safetensors": this project's own file, official key names, the PixArtConfig in the metadata.

Every reader returns official key names, which are this project's module names, so a load is one
`load_state_dict(assign=True)` into a model built on the meta device (no second copy of the weights in RAM).
"""

import contextlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from configs.errors import UserError
from models.embeddings import sincos_pos_embed_2d
from models.pixart import PIXART_ARCHS, PixArt, PixArtConfig, build_pixart
from models.safetensors_file import save_file
from models.shipped import ShippedWeightsError, verify_shipped

log = logging.getLogger(__name__)

FORMATS = ("official", "diffusers", "safetensors")
FORMAT_TAG = "pixart-delta"  # metadata["format"] of this project's safetensors files
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
NULL_CAPTION_FILE = "null_caption.safetensors"
NULL_CAPTION_KEY = "y_embedder.y_embedding"  # (caption_tokens, caption_channels) buffer; diffusers drops it


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


@dataclass
class Checkpoint:
    """Weights in official key names, plus what the file said about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str
    path: Path
    config: PixArtConfig | None = None           # from the file when it carries one (diffusers, safetensors)
    metadata: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    The temporary name is unique (pid + random). The result gets the usual permissions of new files (the umask's),
    also when the writer makes private files (safetensors writes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.touch()
    mode = tmp.stat().st_mode & 0o777  # what a new file gets here
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def normalise_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the permissions new ones get here (private writers aside)."""
    probe = folder / f".mode-probe-{uuid.uuid4().hex[:8]}"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    dir_mode = folder.stat().st_mode & 0o777  # made by os.mkdir: the umask's
    for item in folder.rglob("*"):
        os.chmod(item, dir_mode if item.is_dir() else file_mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace_existing: bool = False):
    """Yield a new empty folder beside `path`; on success it becomes `path` (an existing `path` is removed first if
    replace_existing, else it is an error), on failure it is deleted. Made with os.mkdir, so it has the usual
    permissions of new folders (tempfile's are private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace_existing:
        raise CheckpointError(f"{path} already exists; remove it or choose another destination")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        normalise_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Key maps: official <-> diffusers


def _diffusers_block_map(i: int) -> dict[str, str]:
    """Official -> diffusers names for block i's unfused tensors (qkv and kv handled separately)."""
    o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    return {
        o + "scale_shift_table": d + "scale_shift_table",
        o + "attn.proj.weight": d + "attn1.to_out.0.weight",
        o + "attn.proj.bias": d + "attn1.to_out.0.bias",
        o + "cross_attn.q_linear.weight": d + "attn2.to_q.weight",
        o + "cross_attn.q_linear.bias": d + "attn2.to_q.bias",
        o + "cross_attn.proj.weight": d + "attn2.to_out.0.weight",
        o + "cross_attn.proj.bias": d + "attn2.to_out.0.bias",
        o + "mlp.fc1.weight": d + "ff.net.0.proj.weight",
        o + "mlp.fc1.bias": d + "ff.net.0.proj.bias",
        o + "mlp.fc2.weight": d + "ff.net.2.weight",
        o + "mlp.fc2.bias": d + "ff.net.2.bias",
    }


_DIFFUSERS_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}


def _num_blocks(keys, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and split (qkv -> q, k, v; kv -> k, v) official tensors into diffusers' names."""
    out = {}
    for o, d in _DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            if f"{o}.{p}" in sd:
                out[f"{d}.{p}"] = sd[f"{o}.{p}"]
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"]
    for i in range(_num_blocks(sd, "blocks.")):
        out.update({d: sd[o] for o, d in _diffusers_block_map(i).items()})
        d = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)
            out[d + f"attn1.to_q.{p}"], out[d + f"attn1.to_k.{p}"], out[d + f"attn1.to_v.{p}"] = q, k, v
            k, v = sd[f"blocks.{i}.cross_attn.kv_linear.{p}"].chunk(2, dim=0)
            out[d + f"attn2.to_k.{p}"], out[d + f"attn2.to_v.{p}"] = k, v
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_official(get, keys) -> dict[str, torch.Tensor]:
    """Inverse of official_to_diffusers; `get(key)` fetches one diffusers tensor (lazily, to bound memory)."""
    keys = set(keys)
    out, used = {}, set()

    def take(name):
        used.add(name)
        return get(name)

    for o, d in _DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in keys:
                out[f"{o}.{p}"] = take(f"{d}.{p}")
    if "scale_shift_table" in keys:
        out["final_layer.scale_shift_table"] = take("scale_shift_table")
    for i in range(_num_blocks(keys, "transformer_blocks.")):
        d = f"transformer_blocks.{i}."
        for o_key, d_key in _diffusers_block_map(i).items():
            if d_key in keys:
                out[o_key] = take(d_key)
        for p in ("weight", "bias"):
            qkv = [d + f"attn1.to_{n}.{p}" for n in "qkv"]
            if all(k in keys for k in qkv):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(k) for k in qkv], dim=0)
            kv = [d + f"attn2.to_{n}.{p}" for n in "kv"]
            if all(k in keys for k in kv):
                out[f"blocks.{i}.cross_attn.kv_linear.{p}"] = torch.cat([take(k) for k in kv], dim=0)
    for k in sorted(keys - used):  # kept under their own name so the report lists them as unexpected
        out[k] = get(k)
    return out


def diffusers_config(cfg: PixArtConfig) -> dict:
    """transformer/config.json for diffusers.PixArtTransformer2DModel."""
    cfg = cfg.resolved()
    if cfg.mlp_ratio != 4.0:
        raise CheckpointError(f"diffusers' PixArt block has an MLP ratio of 4; this model has {cfg.mlp_ratio}")
    if cfg.guidance_embedding:
        raise CheckpointError("diffusers' PixArtTransformer2DModel has no guidance embedding (w input): keep this "
                              "student as safetensors or an official .pth")
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "cross_attention_dim": cfg.hidden_size,
        "attention_bias": True,
        "sample_size": cfg.latent_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": cfg.pe_interpolation,
        "use_additional_conditions": cfg.micro_conditions,
        "caption_channels": cfg.caption_channels,
        "dropout": 0.0,
        "upcast_attention": False,
        "attention_type": "default",
    }


def config_from_diffusers(dc: dict, caption_tokens: int = 120) -> PixArtConfig:
    """PixArtConfig from a diffusers transformer/config.json (diffusers' defaults where keys are absent)."""
    heads, head_dim = dc.get("num_attention_heads", 16), dc.get("attention_head_dim", 72)
    depth, hidden = dc.get("num_layers", 28), heads * head_dim
    sample = dc.get("sample_size", 128)
    in_ch = dc.get("in_channels", 4)
    out_ch = dc.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"out_channels {out_ch} is neither in_channels {in_ch} nor twice it (learned sigma)")
    interp = dc.get("interpolation_scale") or max(sample // 64, 1)
    micro = dc.get("use_additional_conditions")
    arch = next((n for n, dims in PIXART_ARCHS.items() if dims == (depth, hidden, heads)), "XL")
    return PixArtConfig(
        arch=arch, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=dc.get("patch_size", 2),
        in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch, caption_channels=dc.get("caption_channels") or 4096,
        caption_tokens=caption_tokens, latent_size=sample, pe_interpolation=float(interp),
        micro_conditions=bool(sample == 128 if micro is None else micro),
    )


# ----------------------------------------------------------------------------------------------------------
# What a state dict looks like


def _other_model_kind(keys) -> str | None:
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
    out["depth"] = _num_blocks(sd, "blocks.")
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
    kind = _other_model_kind(sd.keys())
    if kind:
        return [f"this looks like {kind}"]
    seen, want = infer_config(sd), asdict(cfg.resolved())
    hints = []
    if seen.get("caption_tokens") == 300 and not seen.get("micro_conditions"):
        hints.append("this looks like a PixArt-Sigma checkpoint (300 caption tokens, no micro-condition "
                     "embedders); this codebase's model is PixArt-alpha (120 tokens)")
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
        _diffusers_dir(path)  # raises if the folder is not a diffusers transformer
        return "diffusers"
    if path.suffix == ".safetensors":
        keys, meta = _safetensors_header(path)
        if meta.get("format") == FORMAT_TAG:
            return "safetensors"
        return "diffusers" if any(k.startswith("transformer_blocks.") for k in keys) else "official"
    return "official"


def _diffusers_dir(path: Path) -> Path:
    """The folder holding the transformer's config.json (a pipeline root or the transformer folder itself)."""
    for cand in (path / "transformer", path):
        if (cand / "config.json").is_file():
            cls = json.loads((cand / "config.json").read_text()).get("_class_name", "")
            if cls and cls not in ("PixArtTransformer2DModel", "Transformer2DModel"):
                raise CheckpointError(f"{cand / 'config.json'} describes a {cls}, not a PixArtTransformer2DModel")
            return cand
    raise CheckpointError(f"folder {path} is not a diffusers PixArt transformer: expected transformer/config.json "
                          f"or config.json with {DIFFUSERS_WEIGHTS} beside it")


def _safetensors_header(path: Path) -> tuple[list[str], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file, it may be corrupt or truncated "
                              f"({e}); re-download or re-convert it") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with mmap (weights stay in the page cache, not copied) and weights_only."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: the file may be corrupt or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"re-download or re-convert it") from e
    if isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT:
        raise CheckpointError(training_state_message(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensor state dict (top-level keys: {list(obj)[:8]})")
    return obj


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint into official key names."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        _, meta = _safetensors_header(path)
        cfg = _config_from_json(meta["model_config"], path) if "model_config" in meta else None
        return Checkpoint(_read_safetensors(path), fmt, path, cfg, meta)
    if fmt == "official":
        sd = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
        return Checkpoint(sd, fmt, path, _read_sidecar_config(path))
    if path.is_file():  # a bare diffusers-key safetensors file without config.json
        with safe_open(str(path), framework="pt") as f:
            return Checkpoint(diffusers_to_official(f.get_tensor, f.keys()), fmt, path)
    return _read_diffusers_dir(_diffusers_dir(path))


def _read_diffusers_dir(folder: Path) -> Checkpoint:
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        shards = [DIFFUSERS_WEIGHTS]
    else:
        raise CheckpointError(f"{folder} has config.json but no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} "
                              f"(.bin weights are not supported: convert them with diffusers' save_pretrained)")
    handles = {}
    with contextlib.ExitStack() as stack:
        where = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"shard {folder / shard} named in {DIFFUSERS_INDEX} is missing")
            _safetensors_header(folder / shard)
            handles[shard] = stack.enter_context(safe_open(str(folder / shard), framework="pt"))
            where.update({k: shard for k in handles[shard].keys()})
        sd = diffusers_to_official(lambda k: handles[where[k]].get_tensor(k), where.keys())
    cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()))
    if (folder / NULL_CAPTION_FILE).is_file():  # written by this project: the null caption and the arch name
        sd[NULL_CAPTION_KEY] = _read_safetensors(folder / NULL_CAPTION_FILE)["y_embedding"]
        arch = _safetensors_header(folder / NULL_CAPTION_FILE)[1].get("arch", cfg.arch)
        cfg = replace(cfg, caption_tokens=sd[NULL_CAPTION_KEY].shape[0], arch=arch)
    return Checkpoint(sd, "diffusers", folder, cfg)


def _read_sidecar_config(path: Path) -> PixArtConfig | None:
    """The `model:` section of NAME.yaml beside an official NAME.pth (written by save_checkpoint), if any."""
    side = path.with_suffix(".yaml")
    if not side.is_file():
        return None
    data = yaml.safe_load(side.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    return _config_from_json(json.dumps(data["model"]), side)


def _config_from_json(text: str, path: Path) -> PixArtConfig:
    data = json.loads(text)
    valid = {f.name for f in fields(PixArtConfig)}
    unknown = set(data) - valid
    if unknown:
        raise CheckpointError(f"{path} stores model config keys this version does not know: {sorted(unknown)}")
    return PixArtConfig(**data)


TRAIN_STATE_FORMAT = "pixart-delta-train-state"  # engine/state.py's checkpoints (model, optimiser, RNG, ...)


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read without its weights."""

    config: PixArtConfig | None      # None: an official file without a config beside it
    null_caption: bool | None        # whether it holds the learned null caption; None: unknown until loaded
    metadata: dict[str, str]         # this project's safetensors metadata (run config, step, ...)


def peek(path: str | os.PathLike) -> CheckpointInfo:
    """Config, null caption and metadata of a checkpoint, reading no weights; a training-state file is an error.

    For checks before heavy loading, e.g. the transformer's latent channels against the autoencoder's.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        keys, meta = _safetensors_header(path)
        return CheckpointInfo(_config_from_json(meta["model_config"], path), NULL_CAPTION_KEY in keys, meta)
    if fmt == "diffusers" and path.is_dir():
        folder = _diffusers_dir(path)
        return CheckpointInfo(config_from_diffusers(json.loads((folder / "config.json").read_text())),
                              (folder / NULL_CAPTION_FILE).is_file(), {})
    if fmt == "official" and path.suffix != ".safetensors":
        obj = None
        with contextlib.suppress(Exception):  # unreadable files are reported by the loader with their reason
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT:
            raise CheckpointError(training_state_message(path))
    return CheckpointInfo(_read_sidecar_config(path) if fmt == "official" else None, None, {})


def training_state_message(path) -> str:
    return (f"{path} is a training checkpoint (model, optimiser and RNG state for --resume), not weights: use the "
            f"run's ema.safetensors (or weights.safetensors), which every checkpoint step exports, or export this "
            f"step's weights with `python tools/convert_checkpoint.py {path} OUT.safetensors --to safetensors`")


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
    cfg = _config_from_json(json.dumps(run["model"]), path)
    metadata = {"config": yaml.safe_dump(run, sort_keys=False), "step": str(state["step"])}
    return Checkpoint(sd, "training-state", path, cfg, metadata)


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
    quantization: str = "none"  # int8: the block linear layers hold int8 weights (models/quantize.py)


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
    kind = _other_model_kind(sd.keys())
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
        meta = {"format": FORMAT_TAG, "model_config": json.dumps(asdict(cfg)), **(metadata or {})}
        if int8:
            meta["quantization"] = "int8"
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
    elif fmt == "official":
        grid = cfg.latent_size // cfg.patch_size  # the buffer official code expects, at the config's base grid
        pos = sincos_pos_embed_2d(cfg.hidden_size, grid, grid, grid, cfg.pe_interpolation)[None]
        with atomic_path(path) as tmp:
            torch.save({"state_dict": {**sd, "pos_embed": pos}}, tmp)
        with atomic_path(path.with_suffix(".yaml")) as tmp:  # the config official files lack; also a --config
            tmp.write_text(yaml.safe_dump({"model": asdict(cfg)}, sort_keys=False))
    else:
        _write_diffusers(sd, cfg, path, max_shard_bytes, overwrite)
    return path


def _write_diffusers(sd, cfg: PixArtConfig, root: Path, max_shard_bytes: int | None, overwrite: bool) -> None:
    """root/transformer/{config.json, weights (sharded past max_shard_bytes), null_caption.safetensors}."""
    weights = official_to_diffusers(sd)
    with atomic_dir(root / "transformer", replace_existing=overwrite) as tmp:
        shards = _shard(weights, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / DIFFUSERS_WEIGHTS))
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name))
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in weights.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2))
        if NULL_CAPTION_KEY in sd:
            save_file({"y_embedding": sd[NULL_CAPTION_KEY]}, str(tmp / NULL_CAPTION_FILE), metadata={"arch": cfg.arch})
        (tmp / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))


def _shard(sd: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [sd]
    shards, current, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + n
    return shards + [current] if current else shards

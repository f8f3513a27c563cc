"""diffusers' layout: a folder with transformer/config.json + diffusion_pytorch_model.safetensors (or shards), as
diffusers.PixArtTransformer2DModel reads and writes it, inside a pipeline root (PixArtAlphaPipeline or
PixArtSigmaPipeline: model_index.json names which) or alone.

The key map official <-> diffusers (fused qkv and kv split) is the same for every variant; what diffusers cannot
hold (a guidance embedding, KV compression) is refused by `diffusers_config`. diffusers does not store the null
caption; this project writes it beside the weights as null_caption.safetensors.
"""

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import CheckpointError
from common.files import atomic_dir
from common.safetensors_file import save_file
from models.formats.safetensors import read_safetensors, safetensors_header
from models.variants import ALPHA, FAMILIES, PIXART_ARCHS, VARIANTS, Family, PixArtConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
NULL_CAPTION_FILE = "null_caption.safetensors"
NULL_CAPTION_KEY = "y_embedder.y_embedding"  # (caption_tokens, caption_channels) buffer; diffusers drops it
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")

# ----------------------------------------------------------------------------------------------------------
# Key map: official <-> diffusers


def diffusers_block_map(i: int) -> dict[str, str]:
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


DIFFUSERS_TOP = {
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



def num_blocks(keys, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and split (qkv -> q, k, v; kv -> k, v) official tensors into diffusers' names."""
    out = {}
    for o, d in DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            if f"{o}.{p}" in sd:
                out[f"{d}.{p}"] = sd[f"{o}.{p}"]
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"]
    for i in range(num_blocks(sd, "blocks.")):
        out.update({d: sd[o] for o, d in diffusers_block_map(i).items()})
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

    for o, d in DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in keys:
                out[f"{o}.{p}"] = take(f"{d}.{p}")
    if "scale_shift_table" in keys:
        out["final_layer.scale_shift_table"] = take("scale_shift_table")
    for i in range(num_blocks(keys, "transformer_blocks.")):
        d = f"transformer_blocks.{i}."
        for o_key, d_key in diffusers_block_map(i).items():
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
    if cfg.kv_compress_blocks:
        raise CheckpointError(f"diffusers' PixArtTransformer2DModel has no KV compression (this model compresses "
                              f"blocks {cfg.kv_compress_blocks}): keep it as safetensors or an official .pth")
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



def config_from_diffusers(dc: dict, family: Family = ALPHA) -> PixArtConfig:
    """PixArtConfig from a diffusers transformer/config.json (diffusers' defaults where keys are absent); the caption
    length is the family's (diffusers' config does not store it)."""
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
        caption_tokens=family.caption_tokens, latent_size=sample, pe_interpolation=float(interp),
        micro_conditions=bool(sample == 128 if micro is None else micro),
    )


def pipeline_family(folder: Path) -> Family | None:
    """The family model_index.json beside a transformer folder names (PixArtSigmaPipeline -> Sigma), if any."""
    index = folder.parent / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name", "")
    return next((f for f in FAMILIES.values() if f.diffusers_pipeline == name), None)


# ----------------------------------------------------------------------------------------------------------
# Reading


def diffusers_dir(path: Path) -> Path:
    """The folder holding the transformer's config.json (a pipeline root or the transformer folder itself)."""
    for cand in (path / "transformer", path):
        if (cand / "config.json").is_file():
            cls = json.loads((cand / "config.json").read_text()).get("_class_name", "")
            if cls and cls not in TRANSFORMER_CLASSES:
                raise CheckpointError(f"{cand / 'config.json'} describes a {cls}, not a PixArtTransformer2DModel")
            return cand
    raise CheckpointError(f"folder {path} is not a diffusers PixArt transformer: expected transformer/config.json "
                          f"or config.json with {DIFFUSERS_WEIGHTS} beside it")


def read_diffusers_file(path: Path) -> dict[str, torch.Tensor]:
    """A bare diffusers-key safetensors file (no config.json), in official key names."""
    with safe_open(str(path), framework="pt") as f:
        return diffusers_to_official(f.get_tensor, f.keys())


def read_diffusers_dir(folder: Path) -> tuple[dict[str, torch.Tensor], PixArtConfig, bool]:
    """(official-key weights, config, whether the file said its caption length) of a transformer folder. The
    caption length comes from this project's null caption file, else from the pipeline class in model_index.json."""
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
            safetensors_header(folder / shard)
            handles[shard] = stack.enter_context(safe_open(str(folder / shard), framework="pt"))
            where.update({k: shard for k in handles[shard].keys()})
        sd = diffusers_to_official(lambda k: handles[where[k]].get_tensor(k), where.keys())
    cfg, known = diffusers_folder_config(folder)
    if (folder / NULL_CAPTION_FILE).is_file():  # written by this project: the null caption and the arch name
        sd[NULL_CAPTION_KEY] = read_safetensors(folder / NULL_CAPTION_FILE)["y_embedding"]
        cfg = replace(cfg, caption_tokens=sd[NULL_CAPTION_KEY].shape[0])
    return sd, cfg, known


def diffusers_folder_config(folder: Path) -> tuple[PixArtConfig, bool]:
    """(config, whether the folder says its caption length) of a transformer folder, reading no weights."""
    family = pipeline_family(folder)
    cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()), family or ALPHA)
    null_caption = folder / NULL_CAPTION_FILE
    if null_caption.is_file():
        meta = safetensors_header(null_caption)[1]
        with safe_open(str(null_caption), framework="pt") as f:
            tokens = f.get_slice("y_embedding").get_shape()[0]
        variant = meta.get("variant") if meta.get("variant") in VARIANTS else None  # one this version knows
        cfg = replace(cfg, caption_tokens=tokens, arch=meta.get("arch", cfg.arch), variant=variant)
        return cfg, True
    return cfg, family is not None


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_diffusers(sd, cfg: PixArtConfig, root: Path, max_shard_bytes: int | None, overwrite: bool) -> None:
    """root/transformer/{config.json, weights (sharded past max_shard_bytes), null_caption.safetensors}."""
    weights = official_to_diffusers(sd)
    with atomic_dir(root / "transformer", replace_existing=overwrite) as tmp:
        shards = split_shards(weights, max_shard_bytes)
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
            save_file({"y_embedding": sd[NULL_CAPTION_KEY]}, str(tmp / NULL_CAPTION_FILE),
                      metadata={"arch": cfg.arch, "variant": cfg.variant or ""})
        (tmp / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))


def split_shards(sd: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
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

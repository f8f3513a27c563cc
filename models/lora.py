"""LoRA adapters on a PixArt transformer (peft), for LCM-LoRA: one copy of the weights serves as the student
(adapters on) and as the teacher (adapters off).

    model = add_lora(teacher, rank=32)           # adapter B matrices start at zero: model == teacher exactly
    with adapters_disabled(model): ...           # the teacher
    merged = merged_state_dict(model.state_dict(), scaling(32, 32))   # official keys, LoRA folded in
    adapters = diffusers_lora_state_dict(model.state_dict())           # peft keys of diffusers' transformer
    save_diffusers_lora(model.state_dict(), rank, alpha, "student.lora.safetensors")   # + its LoraConfig
"""

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from models.formats.diffusers import diffusers_block_map

ADAPTER = "default"
# Every linear layer of every block (the LCM-LoRA recipe adapts the attention and MLP projections).
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.(fc1|fc2))"
_PEFT_KEY = re.compile(r"^(?P<layer>.+)\.(?P<kind>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


def scaling(rank: int, alpha: float | None) -> float:
    """LoRA's output scale alpha / rank (alpha defaults to the rank: scale 1)."""
    return (alpha if alpha is not None else rank) / rank


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = TARGETS) -> nn.Module:
    """Inject rank-`rank` adapters into the target linear layers, in place; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=True)  # A: Kaiming, B: zero -> the adapted model equals the base
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block, back on (and trainable) after it."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft state dict folded back to plain weights: W = W_base + scale * B A, under the original names."""
    out, adapters = {}, {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match:
            adapters.setdefault(match["layer"], {})[match["kind"]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for layer, ab in adapters.items():
        weight = out[f"{layer}.weight"]
        delta = scale * (ab["lora_B"].float() @ ab["lora_A"].float())  # (out, in)
        out[f"{layer}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out


def diffusers_lora_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters in the peft layout of diffusers' PixArtTransformer2DModel (transformer_blocks.N.attn1.to_q.
    lora_A.weight, ...): a fused qkv (kv) adapter becomes one adapter per projection sharing A, with B split."""
    out = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            continue
        layer, kind = match["layer"], match["kind"]
        block = int(layer.split(".")[1])
        d = f"transformer_blocks.{block}."
        fused = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
                 "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v")}
        local = layer.split(".", 2)[2]
        if local in fused:
            names = fused[local]
            parts = [value.clone() for _ in names] if kind == "lora_A" else value.chunk(len(names), dim=0)
            out.update({f"{d}{n}.{kind}.weight": p.contiguous() for n, p in zip(names, parts)})
        else:
            target = diffusers_block_map(block)[f"{layer}.weight"]
            out[target.replace(".weight", f".{kind}.weight")] = value.contiguous()
    return out


def diffusers_lora_targets(state: dict[str, torch.Tensor]) -> list[str]:
    """target_modules for a peft LoraConfig that loads diffusers_lora_state_dict(state) into diffusers' model."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in diffusers_lora_state_dict(state)})


def save_diffusers_lora(state: dict[str, torch.Tensor], rank: int, alpha: float | None, path: Path,
                        metadata: dict[str, str] | None = None) -> None:
    """The adapters as safetensors in diffusers' peft layout, with the LoraConfig that loads them in the metadata
    (`lora_config`: r, lora_alpha, target_modules), so that

        config = LoraConfig(**json.loads(safe_open(path, "pt").metadata()["lora_config"]))
        inject_adapter_in_model(config, transformer); set_peft_model_state_dict(transformer, load_file(path))

    gives diffusers' PixArtTransformer2DModel this student."""
    from common.files import atomic_path
    from common.safetensors_file import save_file

    adapters = diffusers_lora_state_dict(state)
    if not adapters:
        raise UserError("the state dict has no LoRA adapters (lora_A / lora_B weights) to export")
    config = {"r": rank, "lora_alpha": alpha if alpha is not None else rank,
              "target_modules": diffusers_lora_targets(state)}
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp),
                  metadata={**(metadata or {}), "lora_config": json.dumps(config), "format": "pt"})

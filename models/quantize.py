"""8-bit weights for the transformer and T5, through torchao; int8 checkpoints that load without re-quantising.

Modes of the transformer (sample.quantize, --quantize):

  none  float weights (the sample dtype).
  int8  int8 weights, one scale per output row, and int8 activations, one scale per token, chosen at run time
        (torchao's Int8DynamicActivationInt8WeightConfig): the GEMMs run on int8 x int8 -> int32 kernels
        (torch._int_mm), which on an AVX2 CPU are about 5x faster than fp32 GEMMs; weight memory is half of fp16.
  fp8   float8 e4m3 weights and activations, one scale per row/token (Float8DynamicActivationFloat8WeightConfig):
        CUDA GPUs of compute capability 8.9 or later (L4, L40, RTX 4090, H100, H200).

Only the Linear layers inside the transformer blocks are quantised (self- and cross-attention, MLP: 97% of XL-2's
parameters and nearly all of its FLOPs); the patch, timestep and caption embedders, adaLN-single's t_block and the
final layer keep the sample dtype, as the precision-sensitive ends of the network.

Why torchao's dynamic int8 (measured on this 2-core AVX2 CPU, one 1152 -> 4608 -> 1152 MLP at 2048 tokens):
fp32 229 ms; torchao weight-only int8 240 ms (dequantises to fp32 GEMMs: memory only); torchao dynamic int8 154 ms
in eager mode and 43 ms under torch.compile (which fuses the per-token activation quantisation into the GEMM's
neighbours); PyTorch's own quantize_dynamic 55 ms, but it is deprecated and warns on every use. T5 (run once per
prompt, where memory matters and its activations have outliers) gets torchao's weight-only int8.

int8 checkpoints (`tools/convert_checkpoint.py SRC OUT.safetensors --quantize int8`) hold each quantised weight
as its int8 values under the weight's own key plus `<key>_scale` (float32, one per row), with metadata
`quantization: int8`; loading assigns those tensors as they are.

int8-weights checkpoints (`--quantize int8-weights`) store the same layers the same way (round(w / s) with s the
row's largest |w| over 127), with metadata `quantization: int8-weights`, but are a storage format only: loading
multiplies the values back by their scales and the model computes in float as before (each weight within half a
step, s / 2, of the original). The file is about 55% of fp16 for a small PixArt; the shipped shapes students
use it to fit the weights budget, at the float model's speed where the int8 GEMMs would not pay off.
"""

import functools
import logging

import torch
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

MODES = ("none", "int8", "fp8")
FILE_MODES = ("int8", "int8-weights")  # modes a checkpoint file can hold (int8-weights: stored only, float compute)
COMPUTE_MODE = {"none": "none", "int8": "int8", "int8-weights": "none"}  # what a file's mode runs as, once loaded
SCALE_SUFFIX = "_scale"      # key of a quantised weight's per-row scales: "<weight key>_scale"


class QuantizationError(UserError):
    """A quantisation mode this machine or this model cannot run, with what to do instead."""


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """The mode to run on `device`, checked before anything loads: fp8 where the GPU has no fp8 matmuls (or on the
    CPU) falls back to int8 with a warning; an unknown mode or a missing torchao is an error."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return mode
    _require_torchao(mode)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"--quantize {mode} runs on cpu or cuda, not {device.type}")
    if mode == "fp8":
        where = "the CPU"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) >= (8, 9):
                return mode
            where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        log.warning("--quantize fp8 needs a CUDA GPU of compute capability 8.9 or later (L4, L40, RTX 4090, H100); "
                    "%s has no fp8 matmuls, so the transformer runs in int8 instead", where)
        return "int8"
    return mode


def _require_torchao(mode: str) -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise QuantizationError(f"--quantize {mode} needs torchao: pip install torchao (or pip install -e .)") from e


def compute_dtype(mode: str, device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The float dtype a quantised model computes in: int8 on the CPU quantises fp32 activations (fp16/bf16
    activations have no fast CPU kernels here), so a half dtype falls back to fp32 with a warning."""
    if mode == "int8" and torch.device(device).type == "cpu" and dtype != torch.float32:
        log.warning("--quantize int8 on the CPU computes in fp32; the requested %s is ignored (int8 GEMMs with fp32 "
                    "scales are the fast path here)", str(dtype).removeprefix("torch."))
        return torch.float32
    return dtype


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a transformer block (of the base and of a ControlNet branch), by qualified name."""
    from models.pixart import PixArtBlock

    blocks = {id(m) for m in model.modules() if isinstance(m, PixArtBlock)}
    found = {}
    for name, module in model.named_modules():
        if id(module) in blocks:
            for sub, linear in module.named_modules():
                if isinstance(linear, nn.Linear):
                    found[f"{name}.{sub}"] = linear
    return found


def _config(mode: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
    )

    if mode == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_transformer(model: nn.Module, mode: str) -> nn.Module:
    """Quantise, in place, the block Linear layers of a PixArt (or ControlledPixArt) in eval mode; returns it."""
    if mode == "none":
        return model
    _require_torchao(mode)
    from torchao.quantization import quantize_

    linears = block_linears(model).values()
    if not linears:
        raise QuantizationError(f"{type(model).__name__} has no transformer blocks to quantise")
    targets = {id(m) for m in linears if not _is_quantized_tensor(m.weight)}  # e.g. a branch beside an int8 base
    if not targets:
        return model
    quantize_(model, _config(mode), filter_fn=lambda m, _name: id(m) in targets)
    log.info("quantised %d linear layers of the transformer blocks to %s", len(targets), mode)
    return model


def _is_quantized_tensor(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "qdata")


# ----------------------------------------------------------------------------------------------------------
# int8 files: int8 values + per-row float32 scales


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each int8 weight as its int8 values (key) and per-row scales (key + _scale)."""
    out = {}
    for key, value in model.state_dict().items():
        if not _is_quantized_tensor(value):
            out[key] = value
            continue
        if value.qdata.dtype != torch.int8:
            raise QuantizationError(f"{key} is {value.qdata.dtype}: only int8 weights can be saved (fp8 is applied "
                                    f"when loading: save the float checkpoint and pass --quantize fp8)")
        out[key] = value.qdata
        out[key + SCALE_SUFFIX] = value.scale.float().reshape(-1, 1)
    return out


def split_quantized(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(float tensors, {weight key: (int8 values, scales)}) of an int8 file's state dict."""
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in sd.items() if k.endswith(SCALE_SUFFIX)}
    quantized = {}
    for key, scale in scales.items():
        qdata = sd.get(key)
        if qdata is None or qdata.dtype != torch.int8 or qdata.ndim != 2 or scale.shape != (qdata.shape[0], 1):
            raise QuantizationError(f"{key}{SCALE_SUFFIX} has no int8 (rows, columns) weight with one scale per row "
                                    f"beside it: the int8 checkpoint is damaged; re-convert it")
        quantized[key] = (qdata, scale)
    plain = {k: v for k, v in sd.items() if k not in quantized and not k.endswith(SCALE_SUFFIX)}
    stray = [k for k, v in plain.items() if v.dtype == torch.int8]
    if stray:
        raise QuantizationError(f"int8 weights without scales in the checkpoint: {', '.join(stray[:4])}")
    return plain, quantized


@functools.cache
def _int8_template():
    """The tensor class and activation settings torchao gives an int8 weight (read off a tiny quantised layer)."""
    _require_torchao("int8")
    from torchao.quantization import quantize_

    layer = nn.Linear(16, 16)
    quantize_(layer, _config("int8"))
    return type(layer.weight), layer.weight.act_quant_kwargs, tuple(layer.weight.scale.shape)


def int8_weight(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    """A torchao int8 weight made from stored int8 values and per-row scales, computing in `dtype`."""
    cls, act_kwargs, scale_shape = _int8_template()
    scale = scale.to(qdata.device, torch.float32).reshape(-1, *([1] * (len(scale_shape) - 1)))
    tensor = cls(qdata, scale, [1, qdata.shape[1]], dtype, act_quant_kwargs=act_kwargs)
    return nn.Parameter(tensor, requires_grad=False)


def assign_int8(model: nn.Module, quantized: dict, device: torch.device | str, dtype: torch.dtype) -> None:
    """Install stored int8 weights into the block Linear layers they belong to (no re-quantisation)."""
    linears = block_linears(model)
    for key, (qdata, scale) in quantized.items():
        name = key.removesuffix(".weight")
        if name not in linears or not key.endswith(".weight"):
            raise QuantizationError(f"{key} is quantised in the checkpoint but is not a weight of a transformer "
                                    f"block's linear layer of this model")
        linear = linears[name]
        if tuple(qdata.shape) != (linear.out_features, linear.in_features):
            raise QuantizationError(f"{key}: checkpoint {tuple(qdata.shape)}, model "
                                    f"{(linear.out_features, linear.in_features)}")
        linear.weight = int8_weight(qdata.to(device), scale.to(device), dtype)


# ----------------------------------------------------------------------------------------------------------
# int8-weights files: the same int8 values and scales, multiplied back at load (storage only)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales of shape (rows, 1)) of a 2-D weight, symmetric per row: s = max |w| / 127 (1 for a
    row of zeros), q = round(w / s), so that q * s is within s / 2 of w everywhere."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def store_int8_weights(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`sd` (the official keys of `model`) with the weight of every transformer-block Linear as int8 values plus
    `<key>_scale` (the layers int8 compute would quantise); every other tensor unchanged."""
    keys = {f"{name}.weight" for name in block_linears(model)}
    if not keys:
        raise QuantizationError(f"{type(model).__name__} has no transformer blocks to store in int8")
    out = {}
    for key, value in sd.items():
        if key in keys:
            out[key], out[key + SCALE_SUFFIX] = quantize_rows(value)
        else:
            out[key] = value
    return out


def load_int8_weights(sd: dict[str, torch.Tensor], quantized: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An int8-weights file's state dict made float again: each stored weight is its values times their scales."""
    return {**sd, **{key: (q.float() * scale.float()).to(dtype) for key, (q, scale) in quantized.items()}}

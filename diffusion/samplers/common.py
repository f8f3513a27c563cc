"""Pieces every sampler shares: the callback record, step validation, timestep batches and noise draws."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from common.errors import UserError

Denoise = Callable[[Tensor, Tensor], Tensor]  # denoise(x (N, C, H, W), t (N,) long) -> eps (N, C, H, W)


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What a sampler reports to its callback after each denoiser call."""

    index: int  # 0-based step number
    total: int  # number of steps in this run
    timestep: int  # discrete timestep the denoiser saw
    x: Tensor  # (N, C, H, W) sample after the step
    denoised: Tensor  # (N, C, H, W) the step's clean-sample estimate


def check_steps(sampler: str, steps: int, high: int, why: str) -> None:
    """Raise a ValueError naming the valid range when steps is outside 1..high."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= high:
        raise UserError(f"{sampler} steps must be an integer in 1..{high} ({why}), got {steps!r}")


def per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A number, or one value per sample (N,), as a tensor that broadcasts against like (N, C, H, W).

    A number becomes a 0-dim tensor on the CPU, which torch passes to GPU kernels as a scalar argument: moving it to
    the GPU would be a host-to-device copy that waits for the GPU's queue at every sampler step.
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    if not isinstance(value, Tensor) or value.ndim == 0:
        return torch.as_tensor(value, dtype=dtype, device="cpu" if not isinstance(value, Tensor) else value.device)
    value = torch.as_tensor(value, dtype=dtype, device=like.device)
    return value.view(-1, *([1] * (like.ndim - 1)))


def timestep_batch(t: int, x: Tensor) -> Tensor:
    """The timestep t repeated for each sample of x, as a LongTensor (N,) on x's device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (as diffusers does), then moved to x's.

    A list of generators draws row i of the batch from generator i, so a sample's noise does not depend on which
    other samples share its batch.
    """
    if isinstance(generator, (list, tuple)):
        return torch.stack([randn_like(x[i], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    if noise.device.type == "cpu" and x.device.type == "cuda":  # a pinned copy does not wait for the GPU's queue
        return noise.pin_memory().to(x.device, non_blocking=True)
    return noise.to(x.device)

"""DDIM sampler (Song et al. 2021): deterministic for eta = 0, ancestral DDPM-like noise for eta = 1."""

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from diffusion.samplers.common import Denoise, StepInfo, check_steps, per_sample, randn_like, timestep_batch
from diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(steps: int, num_train: int = 1000, spacing: str = "leading") -> Tensor:
    """Descending DDIM timesteps (steps,) as diffusers' DDIMScheduler spaces them (steps_offset 0)."""
    check_steps("DDIM", steps, num_train, f"at most the {num_train} training timesteps")
    if spacing == "leading":  # k (steps - 1), ..., k, 0 with k = T // steps; the largest stays below T - 1
        ts = np.arange(steps - 1, -1, -1) * (num_train // steps)
    elif spacing == "trailing":  # T - 1, T - 1 - T/steps, ... rounded; always starts at T - 1
        # Exactly `steps` entries; diffusers' float arange returns one more for some counts (61, 103, ...).
        ts = np.round(num_train - np.arange(steps) * (num_train / steps)) - 1
    elif spacing == "linspace":  # steps points from T - 1 down to 0 inclusive, rounded
        ts = np.linspace(0, num_train - 1, steps).round()[::-1]
    else:
        raise UserError(f"unknown DDIM timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return torch.from_numpy(ts.astype(np.int64))  # (steps,) descending


def ddim_step(x0: Tensor, eps: Tensor, abar_t: float | Tensor, abar_prev: float | Tensor, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM update to x_prev from the step's x_0 and eps estimates (Song et al. 2021, eq. 12).

    abar_t and abar_prev are numbers or per-sample tensors (N,) (consistency distillation steps every sample from
    its own timestep).
    """
    abar_t, abar_prev = per_sample(abar_t, x0), per_sample(abar_prev, x0)
    # sigma_t(eta)^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)   (eq. 16)
    std = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt()
    # x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - std^2) eps + std z
    x_prev = abar_prev.sqrt() * x0 + (1.0 - abar_prev - std**2).clamp(min=0.0).sqrt() * eps
    x_prev = x_prev if noise is None else x_prev + std * noise
    return x_prev.to(x0.dtype)


def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    eta: float = 0.0,
    spacing: str = "leading",
) -> Tensor:
    """Run DDIM from noise x (N, C, H, W) with `steps` denoiser calls; returns the clean sample."""
    if eta < 0:
        raise UserError(f"DDIM eta must be >= 0, got {eta}")
    timesteps = ddim_timesteps(steps, schedule.num_steps, spacing).tolist()
    abar = schedule.alphas_cumprod.tolist()  # float32 values as Python floats
    for i, t in enumerate(timesteps):
        # Each step moves to the next listed timestep; after the last one alpha_bar is 1 ("set_alpha_to_one").
        # diffusers steps to t - T // steps instead, which is the same thing for "leading" spacing only.
        abar_prev = abar[timesteps[i + 1]] if i + 1 < steps else 1.0
        t_batch = timestep_batch(t, x)  # (N,)
        eps = denoise(x, t_batch)  # (N, C, H, W)
        noise = randn_like(x, generator) if eta > 0 else None  # drawn every step, the last included, like diffusers
        denoised = schedule.eps_to_x0(x, t_batch, eps)  # (N, C, H, W)
        x = ddim_step(denoised, eps, abar[t], abar_prev, eta, noise)
        if callback is not None:
            callback(StepInfo(index=i, total=steps, timestep=t, x=x, denoised=denoised))
    return x

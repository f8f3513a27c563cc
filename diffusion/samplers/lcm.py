"""Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3), as PixArt-LCM runs it.

Each step maps x_t to the consistency estimate f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t); every step
but the last re-noises that estimate to the next timestep with fresh Gaussian noise.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from diffusion.samplers.common import Denoise, StepInfo, check_steps, per_sample, randn_like, timestep_batch
from diffusion.schedule import NoiseSchedule

TIMESTEP_SCALING = 10.0  # s = 10 t in the boundary-condition scalings
SIGMA_DATA = 0.5


def consistency_grid(original_steps: int = 50, num_train: int = 1000) -> Tensor:
    """Ascending timesteps k-1, 2k-1, ..., T-1 (k = T / original_steps) that consistency distillation trains on."""
    if not 1 <= original_steps <= num_train:
        raise UserError(f"LCM original_steps must be in 1..{num_train}, got {original_steps}")
    return torch.arange(1, original_steps + 1) * (num_train // original_steps) - 1  # (original_steps,)


def lcm_timesteps(steps: int, original_steps: int = 50, num_train: int = 1000,
                  timesteps: Sequence[int] | None = None) -> Tensor:
    """Descending LCM timesteps (steps,): evenly spaced picks from the distillation schedule k-1, 2k-1, ..., T-1, or
    the given `timesteps` once checked (a few-step generator trained at its own, dmd.generator_timesteps)."""
    if timesteps is not None:
        return check_timesteps(timesteps, steps, num_train)
    origin = consistency_grid(original_steps, num_train).numpy()[::-1]  # (original_steps,) 999, 979, ..., 19
    check_steps("LCM", steps, original_steps, f"a subset of the original {original_steps}-step schedule")
    picks = np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[picks].astype(np.int64))  # (steps,) descending


def check_timesteps(timesteps: Sequence[int], steps: int, num_train: int = 1000) -> Tensor:
    """Explicit descending timesteps (steps,), checked: one per step, integers in 0..T-1, strictly descending, the
    first T - 1 (the sampler starts from pure noise)."""
    values = list(timesteps)
    hint = "e.g. [999, 639, 339, 119] for 4 steps"
    if any(isinstance(t, bool) or not isinstance(t, int | np.integer) for t in values):
        raise UserError(f"LCM timesteps must be integers, got {values!r} ({hint})")
    if len(values) != steps:
        raise UserError(f"LCM timesteps {values} give {len(values)} steps but steps is {steps}: give one timestep per "
                        f"step (or set steps to {len(values)})")
    if values[0] != num_train - 1 or any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise UserError(f"LCM timesteps {values} must be strictly descending from {num_train - 1} (pure noise) to a "
                        f"timestep >= 0 ({hint})")
    return torch.tensor(values, dtype=torch.int64)


def lcm_boundary_scalings(
    t: float | Tensor, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA
) -> tuple[float | Tensor, float | Tensor]:
    """(c_skip, c_out) at timestep t (a number, or a tensor of per-sample timesteps); c_skip(0) = 1 and c_out(0) = 0
    so that f(x, 0) = x."""
    s = timestep_scaling * (t.double() if isinstance(t, Tensor) else t)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)  # c_skip = sigma_data^2 / (s^2 + sigma_data^2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5  # c_out = s / sqrt(s^2 + sigma_data^2)
    return c_skip, c_out


def consistency_function(x: Tensor, x0: Tensor, t: float | Tensor, timestep_scaling: float = TIMESTEP_SCALING,
                         sigma_data: float = SIGMA_DATA) -> Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t): the parameterisation that makes f(x, 0) = x exactly."""
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling, sigma_data)
    return (per_sample(c_skip, x) * x + per_sample(c_out, x) * x0).to(x.dtype)


def sample_lcm(
    denoise: Denoise,
    x: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    original_steps: int = 50,
    timestep_scaling: float = TIMESTEP_SCALING,
    sigma_data: float = SIGMA_DATA,
    timesteps: Sequence[int] | None = None,
    noise_reuse: float = 0.0,
) -> Tensor:
    """Run multistep LCM sampling from noise x (N, C, H, W) with `steps` denoiser calls; returns the clean sample.
    timesteps: the steps' timesteps (descending from T - 1) instead of LCM's picks of its original schedule.
    noise_reuse: r in [0, 1]; each re-noising uses r eps_hat + sqrt(1 - r^2) z, eps_hat the noise the step's x_t
    implies for its estimate and z fresh noise: 0 is LCM (fresh noise), 1 is deterministic (DDIM-like; TCD's
    gamma = 0)."""
    if not 0.0 <= noise_reuse <= 1.0:
        raise UserError(f"sample.sampler_options.noise_reuse={noise_reuse}: must lie in [0, 1] "
                        "(0: fresh noise at every step, as LCM; 1: the step's implied noise only)")
    timesteps = lcm_timesteps(steps, original_steps, schedule.num_steps, timesteps).tolist()
    for i, t in enumerate(timesteps):
        t_batch = timestep_batch(t, x)  # (N,)
        x0 = schedule.eps_to_x0(x, t_batch, denoise(x, t_batch))  # (N, C, H, W)
        denoised = consistency_function(x, x0, t, timestep_scaling, sigma_data)  # c_skip x_t + c_out x_0
        if i + 1 < steps:  # re-noise to the next timestep (fresh noise, or part the step's own implied noise)
            noise = randn_like(x, generator)  # drawn at every r, so each image's later draws do not depend on r
            if noise_reuse > 0:
                implied = schedule.x0_to_eps(x, t_batch, denoised)  # the noise that takes `denoised` to x at t
                noise = noise_reuse * implied + (1.0 - noise_reuse**2) ** 0.5 * noise
            x = schedule.q_sample(denoised, timestep_batch(timesteps[i + 1], x), noise)
        else:
            x = denoised
        if callback is not None:
            callback(StepInfo(index=i, total=steps, timestep=t, x=x, denoised=denoised))
    return x

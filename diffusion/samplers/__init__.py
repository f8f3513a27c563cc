"""Samplers: plain functions sharing one signature, so any of them swaps in.

    sample_xxx(denoise, x, schedule, steps, *, generator=None, callback=None, **options) -> Tensor

`denoise(x, t)` returns the epsilon prediction for latents x (N, C, H, W) at timesteps t (N,), a LongTensor;
classifier-free guidance is a closure around the model. `callback` receives a StepInfo after each step.
"""

import inspect
from collections.abc import Callable

from common.errors import UserError
from diffusion.samplers.common import Denoise, StepInfo
from diffusion.samplers.ddim import ddim_timesteps, sample_ddim
from diffusion.samplers.dpm_solver import dpm_solver_timesteps, sample_dpm_solver
from diffusion.samplers.lcm import lcm_boundary_scalings, lcm_timesteps, sample_lcm

SAMPLERS: dict[str, Callable] = {
    "ddim": sample_ddim,
    "dpm": sample_dpm_solver,  # PixArt-alpha default: order 2, 20 steps
    "lcm": sample_lcm,  # PixArt-LCM: 2 to 8 steps, no guidance
}


TIMESTEPS: dict[str, Callable] = {"ddim": ddim_timesteps, "dpm": dpm_solver_timesteps, "lcm": lcm_timesteps}


def get_sampler(name: str) -> Callable:
    """The sampler function registered under name."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_timesteps(name: str, steps: int, num_train: int = 1000, options: dict | None = None):
    """The timesteps sampler `name` visits in `steps` steps with its sampler options (those that place the timesteps,
    e.g. LCM's explicit `timesteps`); raises (naming the valid range) before any sampling."""
    get_sampler(name)
    fn = TIMESTEPS[name]
    params = inspect.signature(fn).parameters
    placing = {k: v for k, v in (options or {}).items() if k in params and k not in ("steps", "num_train")}
    return fn(steps, num_train=num_train, **placing)


__all__ = [
    "SAMPLERS",
    "TIMESTEPS",
    "sampler_timesteps",
    "Denoise",
    "StepInfo",
    "ddim_timesteps",
    "dpm_solver_timesteps",
    "get_sampler",
    "lcm_boundary_scalings",
    "lcm_timesteps",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_lcm",
]

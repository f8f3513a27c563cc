"""Diffusion process and sampling: the discrete noise schedule and the DDIM, DPM-Solver++ and LCM samplers."""

from diffusion.samplers import (
    SAMPLERS,
    StepInfo,
    ddim_timesteps,
    dpm_solver_timesteps,
    get_sampler,
    lcm_boundary_scalings,
    lcm_timesteps,
    sample_ddim,
    sample_dpm_solver,
    sample_lcm,
)
from diffusion.schedule import NoiseSchedule

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
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

"""Diffusion process and sampling: the noise schedule, DDIM / DPM-Solver++ / LCM samplers, guidance."""

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
    sampler_timesteps,
)
from diffusion.schedule import DiffusionConfig, NoiseSchedule

__all__ = [
    "SAMPLERS",
    "DiffusionConfig",
    "sampler_timesteps",
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

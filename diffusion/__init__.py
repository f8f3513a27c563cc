"""Diffusion process and sampling: the noise schedule, DDIM / DPM-Solver++ / LCM samplers, guidance.

Names are imported on first use (PEP 562), so that `diffusion.config` (the config sections, read by every run
config) imports no torch.
"""

import importlib

_SAMPLERS = ("SAMPLERS", "StepInfo", "ddim_timesteps", "dpm_solver_timesteps", "get_sampler", "lcm_boundary_scalings",
             "lcm_timesteps", "sample_ddim", "sample_dpm_solver", "sample_lcm", "sampler_timesteps")
_EXPORTS = {**{name: "diffusion.samplers" for name in _SAMPLERS}, "NoiseSchedule": "diffusion.schedule",
            "DiffusionConfig": "diffusion.config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

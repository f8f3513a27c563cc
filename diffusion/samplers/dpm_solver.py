"""Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction ODE solver, orders 1 to 3.

Works in alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and the half log-SNR
lambda_t = log(alpha_t / sigma_t). With h = lambda_t - lambda_s, the exact solution of the probability-flow
ODE from s to t is x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,
and each order approximates x0(lambda) by a polynomial through the last 1, 2 or 3 data predictions.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from configs.errors import UserError
from diffusion.samplers.common import Denoise, StepInfo, check_steps, timestep_batch
from diffusion.schedule import NoiseSchedule

SOLVER_TYPES = ("midpoint", "heun")
LOWER_ORDER_FINAL_BELOW = 15  # with fewer steps the last two steps drop to order <= 2 and 1 (diffusers)


def dpm_solver_timesteps(steps: int, num_train: int = 1000) -> Tensor:
    """Descending timesteps (steps,): linspace(0, T - 1, steps + 1) rounded, reversed, the final 0 dropped."""
    # steps = T would round two grid points onto the same timestep (h = 0), so T - 1 is the limit.
    check_steps("DPM-Solver", steps, num_train - 1, f"distinct timesteps among the {num_train} training ones")
    grid = np.linspace(0, num_train - 1, steps + 1).round()  # (steps + 1,) ascending, grid[0] = 0
    return torch.from_numpy(grid[::-1][:-1].astype(np.int64))  # (steps,) descending


def step_order(i: int, steps: int, order: int) -> int:
    """Solver order of step i: warm-up from order 1, and lower orders at the end (diffusers' rule)."""
    last = i == steps - 1  # the last step lands on sigma = 0, where only the first-order update is used
    if order == 1 or i == 0 or last:
        return 1
    second_last = i == steps - 2 and steps < LOWER_ORDER_FINAL_BELOW
    if order == 2 or i == 1 or second_last:
        return 2
    return 3


def _alpha_sigma_lambda(schedule: NoiseSchedule, timesteps: list[int]) -> tuple[list, list, list]:
    """alpha, sigma, lambda at each timestep plus the final clean point (alpha 1, sigma 0, lambda +inf)."""
    abar = [float(schedule.alphas_cumprod[t]) for t in timesteps]
    alpha = [math.sqrt(a) for a in abar] + [1.0]  # alpha_t = sqrt(alpha_bar_t)
    sigma = [math.sqrt(1.0 - a) for a in abar] + [0.0]  # sigma_t = sqrt(1 - alpha_bar_t)
    lam = [0.5 * math.log(a / (1.0 - a)) for a in abar] + [math.inf]  # lambda_t = log(alpha_t / sigma_t)
    return alpha, sigma, lam


def _update(x: Tensor, x0s: list[Tensor], order: int, i: int, alpha, sigma, lam, solver_type: str) -> Tensor:
    """Advance x from grid point i to i + 1 using the last `order` data predictions x0s[-order:]."""
    h = lam[i + 1] - lam[i]  # step in lambda
    phi1 = -math.expm1(-h)  # 1 - e^{-h}
    # First-order term (DDIM in lambda): x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D0
    out = (sigma[i + 1] / sigma[i]) * x + (alpha[i + 1] * phi1) * x0s[-1]
    if order == 1:
        return out
    r0 = (lam[i] - lam[i - 1]) / h  # previous step size relative to h
    d1_0 = (x0s[-1] - x0s[-2]) / r0  # h * dx0/dlambda, backward difference
    if order == 2:
        if solver_type == "midpoint":  # + 0.5 alpha_t (1 - e^{-h}) D1
            return out + (0.5 * alpha[i + 1] * phi1) * d1_0
        return out + (alpha[i + 1] * (1.0 - phi1 / h)) * d1_0  # heun: + alpha_t ((e^{-h} - 1) / h + 1) D1
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_1 = (x0s[-2] - x0s[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h * dx0/dlambda, second-order accurate
    d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 / 2 * d2x0/dlambda2
    phi2 = (h - phi1) / h**2  # (e^{-h} - 1 + h) / h^2
    # x_t = first-order term + alpha_t ((e^{-h} - 1) / h + 1) D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2
    return out + (alpha[i + 1] * (1.0 - phi1 / h)) * d1 - (alpha[i + 1] * (phi2 - 0.5)) * d2


def sample_dpm_solver(
    denoise: Denoise,
    x: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    order: int = 2,
    solver_type: str = "midpoint",
) -> Tensor:
    """Run multistep DPM-Solver++ from noise x (N, C, H, W) with `steps` denoiser calls; returns the clean sample.

    Deterministic: `generator` is accepted for the shared sampler signature and unused.
    """
    if order not in (1, 2, 3):
        raise UserError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise UserError(f"unknown DPM-Solver solver_type {solver_type!r}; valid: {', '.join(SOLVER_TYPES)}")
    timesteps = dpm_solver_timesteps(steps, schedule.num_steps).tolist()
    alpha, sigma, lam = _alpha_sigma_lambda(schedule, timesteps)  # (steps + 1,) each
    x0s: list[Tensor] = []  # the last `order` data predictions, oldest first
    for i, t in enumerate(timesteps):
        eps = denoise(x, timestep_batch(t, x))  # (N, C, H, W)
        x0 = (x - sigma[i] * eps) / alpha[i]  # data prediction x_0 = (x_t - sigma_t eps) / alpha_t
        x0s = (x0s + [x0])[-order:]
        x = _update(x, x0s, step_order(i, steps, order), i, alpha, sigma, lam, solver_type)
        if callback is not None:
            callback(StepInfo(index=i, total=steps, timestep=t, x=x, denoised=x0))
    return x

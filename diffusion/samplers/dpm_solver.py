"""Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction solver, orders 1 to 3, of the
probability-flow ODE ("dpmsolver++", deterministic) or of the reverse SDE ("sde-dpmsolver++", fresh noise each step).

Works in alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and the half log-SNR
lambda_t = log(alpha_t / sigma_t). With h = lambda_t - lambda_s, the exact solution of the probability-flow
ODE from s to t is x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,
and each order approximates x0(lambda) by a polynomial through the last 1, 2 or 3 data predictions. The SDE's
solution is x_t = (sigma_t / sigma_s) e^{-h} x_s + 2 alpha_t int e^{-2 (lambda_t - lambda)} x0(lambda) dlambda
+ sigma_t sqrt(1 - e^{-2h}) z: the same polynomial terms with the step doubled in the weights, plus noise that
corrects part of the model's error at every step (diffusers' algorithm_type of the same name).
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from diffusion.samplers.common import Denoise, StepInfo, check_steps, randn_like, timestep_batch
from diffusion.schedule import NoiseSchedule

SOLVER_TYPES = ("midpoint", "heun")
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
LOWER_ORDER_FINAL_BELOW = 15  # with fewer steps the last two steps drop to order <= 2 and 1 (diffusers)


def dpm_solver_timesteps(steps: int, num_train: int = 1000, start: int | None = None) -> Tensor:
    """Descending timesteps (steps,): linspace(0, start, steps + 1) rounded, reversed, the final 0 dropped.

    start is the timestep of the first latent: T - 1 (the default) for pure noise; lower for a latent that is a
    clean image noised to that level (the rest of the probability-flow ODE from there)."""
    start = num_train - 1 if start is None else int(start)
    if not 1 <= start <= num_train - 1:
        raise UserError(f"a DPM-Solver start timestep must be in 1..{num_train - 1}, got {start}")
    # steps > start would round two grid points onto the same timestep (h = 0), so start is the limit.
    check_steps("DPM-Solver", steps, start, f"distinct timesteps among the {start + 1} from 0 to {start}")
    grid = np.linspace(0, start, steps + 1).round()  # (steps + 1,) ascending, grid[0] = 0
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


def _update(x: Tensor, x0s: list[Tensor], order: int, i: int, alpha, sigma, lam, solver_type: str,
            noise: Tensor | None = None) -> Tensor:
    """Advance x from grid point i to i + 1 using the last `order` data predictions x0s[-order:].

    noise (like x) selects the SDE update; None the ODE one. The SDE's weight e^{-2(lambda_t - lambda)} halves the
    integral's length scale, so its first- and second-order coefficients are the ODE's with h replaced by g = 2h;
    its third-order D2 coefficient is diffusers' (-1/2 where the ODE has +1/2), which the tests pin.
    """
    h = lam[i + 1] - lam[i]  # step in lambda
    if noise is None:
        g = h  # length of the exponential weight: h for the ODE, 2h for the SDE
        out = (sigma[i + 1] / sigma[i]) * x
    else:
        g = 2.0 * h
        out = (sigma[i + 1] / sigma[i] * math.exp(-h)) * x + (sigma[i + 1] * math.sqrt(-math.expm1(-g))) * noise
    phi1 = -math.expm1(-g)  # 1 - e^{-g}
    # First-order term: x_t = (decay) x_s + alpha_t (1 - e^{-g}) D0 (+ noise)
    out = out + (alpha[i + 1] * phi1) * x0s[-1]
    if order == 1:
        return out
    r0 = (lam[i] - lam[i - 1]) / h  # previous step size relative to h
    d1_0 = (x0s[-1] - x0s[-2]) / r0  # h * dx0/dlambda, backward difference
    if order == 2:
        if solver_type == "midpoint":  # + 0.5 alpha_t (1 - e^{-g}) D1
            return out + (0.5 * alpha[i + 1] * phi1) * d1_0
        return out + (alpha[i + 1] * (1.0 - phi1 / g)) * d1_0  # heun: + alpha_t ((e^{-g} - 1) / g + 1) D1
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_1 = (x0s[-2] - x0s[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h * dx0/dlambda, second-order accurate
    d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 / 2 * d2x0/dlambda2
    d1_term = alpha[i + 1] * (1.0 - phi1 / g)  # alpha_t ((e^{-g} - 1) / g + 1)
    phi2 = (g - phi1) / g**2  # (e^{-g} - 1 + g) / g^2
    half = 0.5 if noise is None else -0.5
    return out + d1_term * d1 - (alpha[i + 1] * (phi2 - half)) * d2  # - alpha_t (phi2 -+ 1/2) D2


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
    algorithm_type: str = "dpmsolver++",
    start: int | None = None,
) -> Tensor:
    """Run multistep DPM-Solver++ from noise x (N, C, H, W) with `steps` denoiser calls; returns the clean sample.

    start: the timestep x is at (default T - 1, pure noise); a lower one solves from a noised image, e.g. the
    teacher's image re-noised to a later step of a few-step student (tools/make_ode_pairs.py --start-timesteps).

    algorithm_type "dpmsolver++" is deterministic (`generator` unused); "sde-dpmsolver++" draws fresh noise from
    `generator` (one per sample, or a list of them) at every step, the last included, as diffusers does.
    """
    if order not in (1, 2, 3):
        raise UserError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise UserError(f"unknown DPM-Solver solver_type {solver_type!r}; valid: {', '.join(SOLVER_TYPES)}")
    if algorithm_type not in ALGORITHMS:
        raise UserError(f"unknown DPM-Solver algorithm_type {algorithm_type!r}; valid: {', '.join(ALGORITHMS)}")
    timesteps = dpm_solver_timesteps(steps, schedule.num_steps, start).tolist()
    alpha, sigma, lam = _alpha_sigma_lambda(schedule, timesteps)  # (steps + 1,) each
    x0s: list[Tensor] = []  # the last `order` data predictions, oldest first
    for i, t in enumerate(timesteps):
        eps = denoise(x, timestep_batch(t, x))  # (N, C, H, W)
        x0 = (x - sigma[i] * eps) / alpha[i]  # data prediction x_0 = (x_t - sigma_t eps) / alpha_t
        x0s = (x0s + [x0])[-order:]
        noise = randn_like(x, generator) if algorithm_type == "sde-dpmsolver++" else None
        x = _update(x, x0s, step_order(i, steps, order), i, alpha, sigma, lam, solver_type, noise)
        if callback is not None:
            callback(StepInfo(index=i, total=steps, timestep=t, x=x, denoised=x0))
    return x

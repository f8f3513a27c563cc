"""Latent consistency distillation (PixArt-delta Algorithm 1, after Luo et al. 2023): the loss that teaches a student
to jump from any point of the teacher's guided probability-flow ODE straight to its end.

For each sample: an index n ~ U{0..K-1} of the K-step DDIM grid t_n = (n + 1) k - 1 (k = T / K: 19, 39, ..., 999);
z = q_sample(x0, t_n, eps); one DDIM step of the frozen teacher, guided with w, from t_n to t_n - k gives x_prev;
the loss is d(f_student(z, t_n), stop-grad f_target(x_prev, t_n - k)), with the boundary-condition
parameterisation f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (f(x, 0) = x) and d the pseudo-Huber distance.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from common.errors import UserError
from diffusion.config import LOSSES
from diffusion.denoiser import Denoiser
from diffusion.guidance import classifier_free_guidance
from diffusion.samplers.common import per_sample
from diffusion.samplers.ddim import ddim_step
from diffusion.samplers.lcm import SIGMA_DATA, TIMESTEP_SCALING, consistency_function, consistency_grid
from diffusion.schedule import NoiseSchedule

Network = Callable[..., Tensor]  # net(x (N, C, H, W), t (N,), **conditions) -> (N, C or 2C, H, W)




@dataclass
class ConsistencyDistillationLoss:
    """loss(student, target, teacher, x0, noise, n, w, cond, uncond) -> per-sample loss (N,) and its terms."""

    schedule: NoiseSchedule
    prediction: str = "eps"            # what the three networks' first C channels predict (eps | v | x0)
    ddim_steps: int = 50               # K, the teacher's solver grid; the skip is k = T / K (20)
    loss: str = "huber"                # huber: sqrt(d^2 + c^2) - c (LCM) | l2: d^2
    huber_c: float = 0.001
    timestep_scaling: float = TIMESTEP_SCALING
    sigma_data: float = SIGMA_DATA
    teacher_substeps: int = 1          # guided DDIM steps of the teacher over one skip

    def __post_init__(self):
        T = self.schedule.num_steps
        if not 1 <= self.ddim_steps <= T or T % self.ddim_steps:
            raise UserError(f"the consistency grid needs a skip k = T / K that divides the {T}-step schedule: "
                             f"ddim_steps {self.ddim_steps} gives {T / self.ddim_steps:g}; use a divisor of {T}, "
                             f"e.g. 50 (k = 20, the paper's)")
        if self.loss not in LOSSES:
            raise UserError(f"consistency loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.grid = consistency_grid(self.ddim_steps, T)  # (K,) 19, 39, ..., 999
        self.skip = T // self.ddim_steps

    def timesteps(self, n: Tensor) -> tuple[Tensor, Tensor]:
        """(t_n, t_n - k clamped at 0) for grid indices n (N,)."""
        t_start = self.grid.to(n.device)[n]
        return t_start, (t_start - self.skip).clamp(min=0)

    def f(self, net: Network, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The consistency function of a network: c_skip(t) x + c_out(t) x0(x, t)."""
        x0 = Denoiser(net, self.schedule, self.prediction, torch.float32).x0(x, t, **cond)
        return consistency_function(x.float(), x0, t, self.timestep_scaling, self.sigma_data)

    @torch.no_grad()
    def teacher_step(self, teacher: Network, z: Tensor, t_start: Tensor, t_end: Tensor, w: Tensor, cond: dict,
                     uncond: dict) -> Tensor:
        """The teacher's guided ODE solve from t_start to t_end: teacher_substeps DDIM steps over evenly spaced
        timesteps, each with eps_hat = eps_c + w (eps_c - eps_u)."""
        eps = Denoiser(teacher, self.schedule, self.prediction, torch.float32).eps
        abar = self.schedule.alphas_cumprod.to(z.device)
        x, t = z.float(), t_start
        for j in range(1, self.teacher_substeps + 1):
            # t_j = t_start - round(j (t_start - t_end) / substeps): the last lands on t_end exactly
            t_next = t_start - torch.div(j * (t_start - t_end) + self.teacher_substeps // 2, self.teacher_substeps,
                                         rounding_mode="floor")
            eps_hat = classifier_free_guidance(eps, cond, uncond, 1.0 + w)(x, t)  # (N, C, H, W)
            x0_hat = self.schedule.eps_to_x0(x, t, eps_hat)  # = x0_c + w (x0_c - x0_u)
            x, t = ddim_step(x0_hat, eps_hat, abar[t], abar[t_next]), t_next  # (N, C, H, W), eta = 0
        return x

    def __call__(self, student: Network, target: Network, teacher: Network, x0: Tensor, noise: Tensor, n: Tensor,
                 w: Tensor, cond: dict, uncond: dict, student_cond: dict | None = None) -> tuple[Tensor, dict]:
        """x0 (N, C, H, W) clean latents, noise like x0, n (N,) grid indices, w (N,) guidance of the teacher.

        cond / uncond condition the teacher (caption / null caption); student and target see cond plus
        student_cond (e.g. {"guidance": w} for a student with a guidance embedding).
        """
        t_start, t_end = self.timesteps(n)
        z = self.schedule.q_sample(x0, t_start, noise)  # (N, C, H, W)
        x_prev = self.teacher_step(teacher, z, t_start, t_end, w, cond, uncond).to(z.dtype)
        conditions = {**cond, **(student_cond or {})}
        with torch.no_grad():
            aim = self.f(target, x_prev, t_end, conditions)  # f_target(x_prev, t_{n-1}), no gradient
        pred = self.f(student, z, t_start, conditions)  # f_student(z, t_n)
        diff2 = (pred - aim).square()
        if self.loss == "huber":
            per_elem = (diff2 + self.huber_c**2).sqrt() - self.huber_c
        else:
            per_elem = diff2
        per_sample_loss = per_elem.mean(dim=tuple(range(1, x0.ndim)))  # (N,)
        return per_sample_loss, {"distance": diff2.mean(dim=tuple(range(1, x0.ndim))).sqrt(),
                                 "t": t_start.float(), "w": per_sample(w, t_start).float().flatten()}

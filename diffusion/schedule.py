"""Discrete variance-preserving noise schedule: betas, alpha_bar and the forward process q(x_t | x_0)."""

from dataclasses import dataclass

import torch
from torch import Tensor

from common.errors import UserError

SCHEDULE_NAMES = ("linear", "scaled_linear")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # (beta_start, beta_end)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Betas and cumulative alpha products of a T-step discrete diffusion, float32 like diffusers."""

    betas: Tensor  # (T,) beta_t
    alphas_cumprod: Tensor  # (T,) alpha_bar_t = prod_{s <= t} (1 - beta_s)

    @classmethod
    def from_betas(cls, betas: Tensor) -> "NoiseSchedule":
        """Build a schedule from a 1-D tensor of betas."""
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        betas = betas.to(torch.float32)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))  # float32 cumprod

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """PixArt / DDPM schedule: betas evenly spaced from beta_start to beta_end."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32))

    @classmethod
    def scaled_linear(
        cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "NoiseSchedule":
        """Stable Diffusion schedule: sqrt(beta) evenly spaced, then squared."""
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32)
        return cls.from_betas(root**2)

    @classmethod
    def from_name(
        cls, name: str, num_steps: int = 1000, beta_start: float | None = None, beta_end: float | None = None
    ) -> "NoiseSchedule":
        """Build a schedule by name ("linear" or "scaled_linear"); missing betas take that schedule's defaults."""
        if name not in SCHEDULE_NAMES:
            raise UserError(f"unknown noise schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
        default_start, default_end = DEFAULT_BETAS[name]
        start = default_start if beta_start is None else beta_start
        end = default_end if beta_end is None else beta_end
        return getattr(cls, name)(num_steps, start, end)

    @property
    def num_steps(self) -> int:
        """Number of training timesteps T."""
        return len(self.betas)

    def _gather(self, t: Tensor, like: Tensor) -> Tensor:
        """float32 alpha_bar at timesteps t (N,), on like's device, shaped (N, 1, ..., 1) to broadcast."""
        if t.ndim != 1:
            raise ValueError(f"timesteps must be a LongTensor of shape (N,), got shape {tuple(t.shape)}")
        abar = self._alphas_cumprod_on(like.device)[t.to(like.device)]  # (N,)
        return abar.view(-1, *([1] * (like.ndim - 1)))  # (N, 1, ..., 1)

    def _alphas_cumprod_on(self, device: torch.device) -> Tensor:
        """alpha_bar on `device`, copied there once: a fresh host-to-GPU copy every step would make the CPU wait for
        the GPU's queue to drain at each sampler step."""
        cache = self.__dict__.setdefault("_device_tables", {})  # the dataclass is frozen; this is a cache, not state
        if device not in cache:
            cache[device] = self.alphas_cumprod.to(device)
        return cache[device]

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t at timesteps t (N,), shaped (N, 1, ..., 1), in like's device and dtype."""
        return self._gather(t, like).to(like.dtype)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Signal and noise scales (alpha_t, sigma_t) at timesteps t, shaped (N, 1, ..., 1), in like's dtype."""
        dtype = torch.promote_types(like.dtype, torch.float32)  # square roots in at least float32
        abar = self._gather(t, like).to(dtype)  # (N, 1, ..., 1)
        # alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
        return abar.sqrt().to(like.dtype), (1.0 - abar).sqrt().to(like.dtype)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Diffuse clean x0 to timestep t with the given noise."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise  # x_t = alpha_t x_0 + sigma_t eps

    def eps_to_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Clean-sample estimate from a noise prediction."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - sigma * eps) / alpha  # x_0 = (x_t - sigma_t eps) / alpha_t

    def x0_to_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Noise estimate from a clean-sample prediction."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma  # eps = (x_t - alpha_t x_0) / sigma_t

    def target(self, prediction: str, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What a network of this prediction type should output for x_t = q_sample(x0, t, noise)."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0  # v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)

    def to_x0(self, prediction: str, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean-sample estimate of a network output of this prediction type."""
        if prediction == "x0":
            return out
        if prediction == "eps":
            return self.eps_to_x0(x_t, t, out)
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * out  # x_0 = alpha_t x_t - sigma_t v

    def to_eps(self, prediction: str, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise estimate of a network output of this prediction type (the samplers' currency)."""
        if prediction == "eps":
            return out
        if prediction == "x0":
            return self.x0_to_eps(x_t, t, out)
        alpha, sigma = self.alpha_sigma(t, x_t)
        return sigma * x_t + alpha * out  # eps = sigma_t x_t + alpha_t v



"""The PixArt-alpha training objective: epsilon MSE plus IDDPM's variational bound for the learned variance.

Nichol & Dhariwal 2021 ("Improved DDPM"), section 3.1: L_hybrid = L_simple + L_vlb, where the network's second
half of channels v in [-1, 1] interpolates the log variance between beta_t and the posterior variance beta~_t,
and L_vlb trains only that interpolation (the mean's gradient is stopped inside L_vlb).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import UserError
from diffusion.denoiser import Denoiser
from diffusion.schedule import NoiseSchedule

EDGE_RANGE = 0.5  # a pixel is on an edge when its 3x3 neighbourhood spans more than this in some channel ([-1, 1])


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] (float64 table) as (N, 1, 1, 1) in like's dtype and device."""
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation used by IDDPM (and the official PixArt code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # edge bin below -0.999: the whole lower tail
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # edge bin above 0.999: the upper tail
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass(frozen=True, eq=False)
class PosteriorTables:
    """float64 tables of q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t), as IDDPM computes them."""

    betas: Tensor
    posterior_variance: Tensor          # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance: Tensor      # log beta~_t, with t = 0 clipped to t = 1 (beta~_0 = 0)
    coef1: Tensor                       # beta_t sqrt(abar_{t-1}) / (1 - abar_t)
    coef2: Tensor                       # (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule) -> "PosteriorTables":
        betas = schedule.betas.double()
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        var = betas * (1.0 - abar_prev) / (1.0 - abar)
        return cls(betas=betas, posterior_variance=var,
                   posterior_log_variance=torch.log(torch.cat([var[1:2], var[1:]])),
                   coef1=betas * abar_prev.sqrt() / (1.0 - abar),
                   coef2=(1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar))

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return _gather(self.coef1, t, x_t) * x0 + _gather(self.coef2, t, x_t) * x_t

    def model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """log variance interpolated by v in [-1, 1] between log beta~_t (v = -1) and log beta_t (v = 1)."""
        frac = (v + 1) / 2
        return frac * _gather(torch.log(self.betas), t, v) + (1 - frac) * _gather(self.posterior_log_variance, t, v)


def vlb_terms(tables: PosteriorTables, schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor,
              eps: Tensor, v: Tensor) -> Tensor:
    """Per-sample variational-bound term in bits per dimension: KL at t > 0, decoder NLL at t = 0 (N,)."""
    true_mean = tables.posterior_mean(x0, x_t, t)
    true_log_var = _gather(tables.posterior_log_variance, t, x_t)
    x0_pred = schedule.eps_to_x0(x_t, t, eps)  # eps is detached by the caller: only the variance learns here
    model_mean = tables.posterior_mean(x0_pred, x_t, t)
    model_log_var = tables.model_log_variance(v, t)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll / math.log(2.0), kl)


class DiffusionLoss:
    """loss(net, x0, t, noise, **cond) -> per-sample PixArt-alpha loss (N,) and its terms.

    The MSE term compares the network's first C channels with the target of its prediction type (PixArt: eps;
    "v" weighs high-noise steps like x_0 errors, which small models trained briefly in pixel space need).
    """

    def __init__(self, schedule: NoiseSchedule, learn_sigma: bool = True, prediction: str = "eps",
                 min_snr_gamma: float = 0.0, timestep_power: float = 1.0,
                 timestep_logit_normal: Sequence[float] | None = None, edge_weight: float = 0.0):
        if not math.isfinite(edge_weight) or edge_weight < 0:
            raise UserError(f"train.loss_edge_weight must be a finite number >= 0 (0: off), got {edge_weight}")
        if not math.isfinite(timestep_power) or timestep_power <= 0:
            raise UserError(f"train.timestep_power must be a finite number > 0 (1: uniform timesteps), got "
                            f"{timestep_power}")
        if timestep_logit_normal is not None:
            if len(timestep_logit_normal) != 2 or not all(math.isfinite(v) for v in timestep_logit_normal) or \
                    timestep_logit_normal[1] <= 0:
                raise UserError(f"train.timestep_logit_normal must be [mean, std] with a finite mean and std > 0 "
                                f"(e.g. [-0.2, 0.8]; null: off), got {timestep_logit_normal}")
            if timestep_power != 1:
                raise UserError("train.timestep_power and train.timestep_logit_normal both reshape the training "
                                "timesteps: set one of them (timestep_power: 1 or timestep_logit_normal: null)")
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma  # > 0: Min-SNR-gamma weighting of the MSE term (Hang et al. 2023)
        self.timestep_power = timestep_power  # training timesteps floor(T u^p): 1 uniform, > 1 more low-noise steps
        # training timesteps floor(T sigmoid(mean + std n)), n ~ N(0, 1): most steps around T sigmoid(mean)
        self.timestep_logit_normal = tuple(float(v) for v in timestep_logit_normal) if timestep_logit_normal else None
        self.edge_weight = edge_weight  # > 0: extra MSE weight on the clean image's edges (pixel_weights)
        self.tables = PosteriorTables.from_schedule(schedule)

    @classmethod
    def from_config(cls, cfg, schedule: NoiseSchedule) -> "DiffusionLoss":
        """The objective a run config asks for: its model's learned sigma, its prediction type and the `train:`
        section's weighting and timestep options (one place, so every trainer picks up a new option)."""
        t = cfg.train
        if t.loss_edge_weight and cfg.autoencoder.kind != "pixel":
            raise UserError(f"train.loss_edge_weight weighs the edges of the clean image, so it needs a pixel-space "
                            f"model (autoencoder.kind: pixel); this config's autoencoder is {cfg.autoencoder.kind!r}: "
                            f"set train.loss_edge_weight: 0")
        return cls(schedule, cfg.model.learn_sigma, cfg.diffusion.prediction, t.min_snr_gamma, t.timestep_power,
                   t.timestep_logit_normal, t.loss_edge_weight)

    def mse_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the MSE term: 1, or Min-SNR's min(SNR, gamma) in x0 terms, expressed for the
        prediction type (eps: / SNR, v: / (SNR + 1), x0: as is). Caps the weight of nearly clean steps, so the
        mid-noise steps where layout and shape are decided get a larger share of the gradient."""
        if self.min_snr_gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        abar = self.schedule.alphas_cumprod.to(t.device)[t].double()
        snr = abar / (1 - abar)
        capped = snr.clamp(max=self.min_snr_gamma)
        weight = {"eps": capped / snr, "v": capped / (snr + 1), "x0": capped}[self.prediction]
        return weight.float()

    def pixel_weights(self, x0: Tensor) -> Tensor | None:
        """(N, 1, H, W) weights of the MSE per pixel, or None (edge_weight 0: all equal).

        A pixel is on an edge when its 3x3 neighbourhood in the clean image x0 (in [-1, 1]) spans more than
        EDGE_RANGE in some channel: the two-pixel band along every outline of a flat-coloured shape. Edge pixels
        weigh 1 + edge_weight, the others 1, normalised to mean 1 per image so the loss keeps its scale. An object's
        outline is what tells its kind apart, but it holds about a tenth of the pixels, so under a plain MSE its
        gradient drowns in that of colour and background (docs/RESULTS.md, the shapes teacher)."""
        if not self.edge_weight:
            return None
        x0 = x0.float()
        spread = F.max_pool2d(x0, 3, 1, 1) + F.max_pool2d(-x0, 3, 1, 1)  # (N, C, H, W) max - min around each pixel
        edge = (spread.amax(dim=1, keepdim=True) > EDGE_RANGE).float()  # (N, 1, H, W)
        weight = 1 + self.edge_weight * edge
        return weight / weight.mean(dim=(2, 3), keepdim=True)

    def training_loss(self, net, x0: Tensor, rng, caption_dropout: float, **cond) -> tuple[Tensor, dict[str, float]]:
        """One training step's loss: per-sample timesteps, noise and caption dropout (to the learned null caption)
        drawn from `rng` (engine.randomness.SampleRandomness), so every trainer built on this objective shares
        them. Returns the batch mean and the mean of each term."""
        t = self.timesteps(rng, x0.device)  # (N,)
        noise = rng.randn(x0.shape[1:], x0.device)  # (N, C, H, W)
        drop = rng.rand(x0.device) < caption_dropout  # (N,) captions -> null caption
        per_sample, terms = self(net, x0, t, noise, drop_caption=drop, **cond)
        return per_sample.mean(), {k: v.mean().item() for k, v in terms.items()}

    def timesteps(self, rng, device) -> Tensor:
        """(N,) training timesteps, one per sample of `rng`: uniform on 0..T-1 (as PixArt trains) when
        timestep_power is 1, else floor(T u^p) with u uniform, whose CDF is (t / T)^(1/p): p > 1 favours the
        nearly clean steps. With timestep_logit_normal (mean, std): floor(T sigmoid(mean + std n)) with n standard
        normal (the logit-normal of Esser et al. 2024), which concentrates training on the mid-noise steps."""
        T = self.schedule.num_steps
        if self.timestep_logit_normal is not None:
            mean, std = self.timestep_logit_normal
            return (T * torch.sigmoid(mean + std * rng.randn((), device))).long().clamp(max=T - 1)
        if self.timestep_power == 1:
            return rng.randint(T, device)
        return (T * rng.rand(device) ** self.timestep_power).long().clamp(max=T - 1)

    def __call__(self, net, x0: Tensor, t: Tensor, noise: Tensor, **cond) -> tuple[Tensor, dict[str, Tensor]]:
        x_t = self.schedule.q_sample(x0, t, noise)  # (N, C, H, W)
        denoiser = Denoiser(net, self.schedule, self.prediction, torch.float32)
        pred, variance = denoiser(x_t, t, **cond)  # (N, C, H, W) each; variance None without learned sigma
        target = self.schedule.target(self.prediction, x0.float(), t, noise.float())
        err = (pred - target).square()  # (N, C, H, W)
        weight = self.pixel_weights(x0)
        if weight is not None:
            err = err * weight
        mse = err.mean(dim=(1, 2, 3)) * self.mse_weight(t)  # L_simple (N,)
        if not self.learn_sigma:
            return mse, {"mse": mse}
        # L_vlb with the mean's gradient stopped; x T / 1000 as IDDPM does for T-step schedules.
        if variance is None:
            raise ValueError("the network has no learned-variance channels (learn_sigma off) but the loss expects them")
        eps = denoiser.convert(pred.detach(), x_t, t, "eps")
        vb = vlb_terms(self.tables, self.schedule, x0.float(), x_t.float(), t, eps, variance.float())
        vb = vb * self.schedule.num_steps / 1000.0
        return mse + vb, {"mse": mse, "vb": vb}

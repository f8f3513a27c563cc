"""Distribution matching distillation (DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis"): a one- or few-step generator trained so that its samples' distribution matches the teacher's.

Three networks, all starting as the teacher:
  generator G   maps noise to an image in `generator_steps` denoiser evaluations (multi-step: each output re-noised to
                the next timestep, as LCM samples; the timesteps are LCM's picks, 999 / 999, 499 / ..., or
                given ones);
  real score    the frozen teacher, guided (CFG): the score of the data distribution;
  fake score    trained with the ordinary denoising loss on G's samples: the score of G's distribution.
The generator's gradient at a random noise level t is the difference of the two scores' clean estimates,
    grad = (x0_fake(x_t) - x0_real(x_t)) / mean |x - x0_real(x_t)|           (per-sample normalisation, DMD eq. 8)
applied through loss = 0.5 ||x - stopgrad(x - grad)||^2, whose gradient with respect to x is exactly grad. DMD2
drops DMD's regression loss, updates the fake score several times per generator update (two time-scale rule) and
optionally adds a GAN term: a small head on the fake score's middle features tells noised real images from noised
generated ones (non-saturating losses). DMD's regression loss is here as an option (regression_loss: the generator
from a stored noise against the teacher's sampled image from that noise; tools/make_ode_pairs.py makes the pairs).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.denoiser import Denoiser, Network
from diffusion.guidance import classifier_free_guidance
from diffusion.samplers.lcm import lcm_timesteps
from diffusion.schedule import NoiseSchedule


class FakeScore(nn.Module):
    """The fake score network, with the optional GAN head on its middle tokens beside it: one logit per image from
    the tokens' mean (pool "mean"), or one per token (pool "tokens": a patch discriminator, each logit judging one
    patch of the image, as PatchGAN's do)."""

    def __init__(self, net: nn.Module, gan_head: bool, pool: str = "mean"):
        super().__init__()
        self.net = net
        self.pool = pool
        self.middle = len(net.blocks) // 2 - 1  # the head reads the tokens after this block
        width = net.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, 1)) if gan_head else None
        for attr in net.denoiser_attributes:
            setattr(self, attr, getattr(net, attr))

    def forward(self, x: Tensor, t: Tensor, *args, **cond) -> Tensor:
        return self.net(x, t, *args, **cond)

    def logits(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        """The GAN head's real-vs-generated logits from the tokens after the middle block: (N,) for pool "mean",
        (N, T) for pool "tokens"."""
        captured = {}

        def hook(i: int, tokens: Tensor, _cond) -> Tensor:
            if i == self.middle:
                captured["tokens"] = tokens
            return tokens

        self.net(x, t, block_hook=hook, **cond)
        tokens = captured["tokens"]  # (N, T, D)
        return self.head(tokens.mean(dim=1) if self.pool == "mean" else tokens).squeeze(-1)


def generator_timesteps(steps: int, num_train: int, timesteps: list[int] | None = None) -> Tensor:
    """A `steps`-step generator's timesteps (K,), descending: LCM's picks of its 50-step grid, so `--sampler lcm
    --steps K` samples it (1: 999; 2: 999, 499; 4: 999, 759, 499, 259), or the given ones (dmd.generator_timesteps;
    sampled with sampler option `timesteps`)."""
    return lcm_timesteps(steps, 50, num_train, timesteps)


@dataclass
class DistributionMatching:
    """The DMD2 objectives: generate(), generator_loss() and fake_score_loss(); networks are arguments."""

    schedule: NoiseSchedule
    prediction: str = "eps"       # what the networks' first C channels predict (eps | v | x0)
    generator_steps: int = 1
    real_guidance: float = 4.5
    t_min: float = 0.02
    t_max: float = 0.98
    regression_edge_weight: float = 0.0  # the regression distance's edge term (regression_distance)
    explicit_timesteps: list[int] | None = None  # the generator's timesteps instead of LCM's picks

    def __post_init__(self):
        self.timesteps = generator_timesteps(self.generator_steps, self.schedule.num_steps,
                                             self.explicit_timesteps)  # (K,) descending

    def x0(self, net: Network, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return Denoiser(net, self.schedule, self.prediction, torch.float32).x0(x, t, **cond)

    def generate(self, generator: Network, noise: Tensor, cond: dict, fresh: list[Tensor],
                 stop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the generator from noise (N, C, H, W); fresh[j] is the noise that re-noises step j's output to step
        j + 1. stop (N,): each sample's last step index (backward simulation: every step before its last runs
        without gradient, the last with it); None: all steps. Returns (images, the input of each sample's last step)."""
        k = len(self.timesteps)
        stop = torch.full((len(noise),), k - 1, device=noise.device) if stop is None else stop
        states = torch.stack(self.step_inputs(generator, noise, cond, fresh, int(stop.max()) + 1))  # (J, N, C, H, W)
        inputs = states[stop, torch.arange(len(noise), device=noise.device)]  # each sample's input at its last step
        t_last = self.timesteps.to(noise.device)[stop]  # (N,)
        return self.x0(generator, inputs, t_last, cond), inputs

    @torch.no_grad()
    def step_inputs(self, generator: Network, noise: Tensor, cond: dict, fresh: list[Tensor],
                    count: int | None = None) -> list[Tensor]:
        """What the generator's first `count` steps (default: all) see when it samples from noise (N, C, H, W), in
        one pass without gradient: noise for the first step, then each output re-noised with fresh[j] to the next
        step's timestep."""
        count = len(self.timesteps) if count is None else count
        x, inputs = noise.float(), [noise.float()]
        for j in range(count - 1):
            t = torch.full((len(noise),), int(self.timesteps[j]), device=noise.device)
            nxt = torch.full((len(noise),), int(self.timesteps[j + 1]), device=noise.device)
            x = self.schedule.q_sample(self.x0(generator, x, t, cond), nxt, fresh[j].float())
            inputs.append(x)
        return inputs

    def noise_levels(self, u: Tensor, t_max: float | None = None) -> Tensor:
        """Timesteps floor(T (t_min + (t_max - t_min) u)) for u ~ U[0, 1) (N,); t_max: another top than the DMD
        term's (the GAN term's dmd.gan_t_max)."""
        T = self.schedule.num_steps
        top = self.t_max if t_max is None else t_max
        return (T * (self.t_min + (top - self.t_min) * u)).long().clamp(0, T - 1)

    @torch.no_grad()
    def real_x0(self, teacher: Network, x_t: Tensor, t: Tensor, cond: dict, uncond: dict) -> Tensor:
        """The guided teacher's clean estimate: eps_u + s (eps_c - eps_u), converted to x0."""
        eps = Denoiser(teacher, self.schedule, self.prediction, torch.float32).eps
        if self.real_guidance > 1:
            eps_hat = classifier_free_guidance(eps, cond, uncond, self.real_guidance)(x_t, t)
        else:
            eps_hat = eps(x_t, t, **cond)
        return self.schedule.eps_to_x0(x_t.float(), t, eps_hat)

    def matching_gradient(self, x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
        """(x0_fake - x0_real) / mean |x - x0_real| per sample: the direction that moves G's samples away from
        where the fake score sees them and toward where the real score does."""
        dims = tuple(range(1, x.ndim))
        scale = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
        return torch.nan_to_num((x0_fake - x0_real) / scale)

    def generator_loss(self, x: Tensor, teacher: Network, fake: Network, t: Tensor, noise: Tensor, cond: dict,
                       uncond: dict) -> tuple[Tensor, dict]:
        """Per-sample DMD loss of generated images x (N, C, H, W) (with gradient) at timesteps t, noise like x."""
        dims = tuple(range(1, x.ndim))
        with torch.no_grad():
            x_t = self.schedule.q_sample(x.detach(), t, noise.float())
            x0_real = self.real_x0(teacher, x_t, t, cond, uncond)
            x0_fake = self.x0(fake, x_t, t, cond)
            grad = self.matching_gradient(x.detach(), x0_real, x0_fake)
        loss = 0.5 * (x - (x - grad).detach()).square().mean(dim=dims)  # d loss / dx = grad / (C H W)
        return loss, {"dmd_grad_norm": grad.square().mean(dim=dims).sqrt()}

    def regression_loss(self, generator: Network, noise: Tensor, target: Tensor, cond: dict,
                        fresh: list[Tensor] | None = None, stop: Tensor | None = None,
                        features: "TeacherFeatures | None" = None) -> Tensor:
        """Per-sample regression loss (DMD's): mean squared distance of the generator's image from `noise` to the
        teacher's image `target` from the same noise. Without `stop` it is the first step's output (the whole sample
        of a one-step generator); with `stop` and `fresh` each sample's image is the output of its step `stop`, the
        steps before it run and re-noised without gradient as in generate() (the teacher's image is then the target
        of the whole chain: the re-noising keeps the first step's content, which the pair fixes). features: a
        teacher-feature term added to the pixel distance."""
        if stop is None:
            stop = torch.zeros(len(noise), dtype=torch.long, device=noise.device)
        out, _ = self.generate(generator, noise, cond, fresh or [], stop)
        return self._distance(out, target.float(), cond, features)

    def regression_loss_at(self, generator: Network, x_t: Tensor, t: Tensor, target: Tensor, cond: dict,
                           features: "TeacherFeatures | None" = None) -> Tensor:
        """Per-sample regression loss of one generator step: its image from x_t at timesteps t (N,), each one of the
        generator's, against the teacher's image from that same x_t (pairs of tools/make_ode_pairs.py
        --start-timesteps, where a later step's target is a function of what that step sees)."""
        out = self.x0(generator, x_t.float(), t, cond)
        return self._distance(out, target.float(), cond, features)

    def _distance(self, out: Tensor, target: Tensor, cond: dict, features: "TeacherFeatures | None") -> Tensor:
        """The regression distance (N,): pixels (with the edge term), plus the teacher-feature term when given."""
        loss = regression_distance(out, target, self.regression_edge_weight)
        if features is not None:
            loss = loss + features.distance(self.schedule, out, target, cond)
        return loss

    def fake_score_loss(self, fake: Network, x: Tensor, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        """Per-sample denoising loss of the fake score on generated images x (no gradient to the generator)."""
        x = x.detach().float()
        x_t = self.schedule.q_sample(x, t, noise.float())
        pred = Denoiser(fake, self.schedule, self.prediction, torch.float32)(x_t, t, **cond).pred
        target = self.schedule.target(self.prediction, x, t, noise.float())
        return (pred - target).square().mean(dim=tuple(range(1, x.ndim)))


def regression_distance(x: Tensor, target: Tensor, edge_weight: float = 0.0) -> Tensor:
    """Per-sample distance of images (N, C, H, W) for the regression term: their mean squared difference, plus
    edge_weight times the mean squared difference of their neighbouring-pixel differences (horizontal and vertical,
    averaged). The edge term is zero for a difference that is flat in space and largest where the two images' edges
    and corners disagree: the few pixels that tell one shape from another, which the squared distance weights as
    little as any other pixel."""
    dims = tuple(range(1, x.ndim))
    diff = x - target
    loss = diff.square().mean(dim=dims)
    if edge_weight:
        across = diff[..., :, 1:] - diff[..., :, :-1]
        down = diff[..., 1:, :] - diff[..., :-1, :]
        loss = loss + edge_weight * 0.5 * (across.square().mean(dim=dims) + down.square().mean(dim=dims))
    return loss


@dataclass
class TeacherFeatures:
    """A learned feature distance for the regression term, read from the frozen teacher itself: both images noised
    to the same timesteps t (N,) with the same noise, the teacher's tokens after each of its blocks for the pair's
    caption, each token scaled to unit length over channels (as LPIPS scales its feature maps), and
    weight x the squared distance of the two images' tokens, summed over channels and averaged over tokens and
    blocks. The image's tokens carry the gradient; the target's are computed without it. A pixel distance weights a
    rounded corner as a handful of pixels; the teacher's tokens, which decide what it draws next, may tell a square
    from a circle by more. t and noise are drawn per step by the caller (so a resumed run draws the same)."""

    net: Network
    t: Tensor
    noise: Tensor
    weight: float

    def tokens(self, schedule: NoiseSchedule, x: Tensor, cond: dict) -> list[Tensor]:
        captured = []

        def hook(i: int, tokens: Tensor, _cond) -> Tensor:
            if i >= 0:
                captured.append(F.normalize(tokens.float(), dim=-1))  # (N, T, D), unit length per token
            return tokens

        x_t = schedule.q_sample(x, self.t, self.noise.float())
        self.net(x_t, self.t, block_hook=hook, **cond)
        return captured

    def distance(self, schedule: NoiseSchedule, x: Tensor, target: Tensor, cond: dict) -> Tensor:
        """Per-sample feature distance (N,) of images x (with gradient) from target."""
        with torch.no_grad():
            reference = self.tokens(schedule, target, cond)
        ours = self.tokens(schedule, x, cond)
        per_block = [(a - b).square().sum(dim=-1).mean(dim=-1) for a, b in zip(ours, reference)]  # each (N,)
        return self.weight * torch.stack(per_block).mean(dim=0)


def _per_sample(loss: Tensor) -> Tensor:
    """(N,) from a loss of one logit per image (N,) or one per token (N, T): the mean over the tokens."""
    return loss.flatten(1).mean(dim=1) if loss.ndim > 1 else loss


def gan_generator_loss(logits_generated: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator (N,): softplus(-D(G(z))), averaged over tokens for per-token logits."""
    return _per_sample(F.softplus(-logits_generated))


def gan_head_loss(logits_real: Tensor, logits_generated: Tensor) -> Tensor:
    """The head's loss (N,): softplus(-D(real)) + softplus(D(generated)), averaged over tokens for per-token logits."""
    return _per_sample(F.softplus(-logits_real) + F.softplus(logits_generated))

"""The PixArt-alpha objective (epsilon MSE + IDDPM variational bound) against independent formulas."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusion.losses import (
    DiffusionLoss,
    PosteriorTables,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()
TABLES = PosteriorTables.from_schedule(SCHEDULE)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_and_learned_variance_match_diffusers_ddpm(t):
    """diffusers' DDPMScheduler (variance_type learned_range) computes the same posterior mean and variance."""
    sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="learned_range",
                          clip_sample=False)
    sched.set_timesteps(1000)
    gen = torch.Generator().manual_seed(t)
    x_t, eps, v = (torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    v = v.clamp(-1, 1)
    ts = torch.tensor([t])
    x0 = SCHEDULE.eps_to_x0(x_t, ts, eps)
    ours_mean = TABLES.posterior_mean(x0, x_t, ts)
    out = sched.step(torch.cat([eps, v], dim=1).float(), t, x_t.float(), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))  # the noise step() drew
    ours_sample = ours_mean + torch.exp(0.5 * TABLES.model_log_variance(v, ts)) * noise.double()
    torch.testing.assert_close(ours_sample.float(), out.prev_sample, rtol=1e-4, atol=1e-4)


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)


def test_discretized_likelihood_integrates_the_gaussian_over_each_bin():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.4, 0.1, 0.2, 0.8], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([0.05, 0.1, 0.2, 0.05, 0.3], dtype=torch.float64))
    normal = torch.distributions.Normal(means, log_scales.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    exact = torch.log(upper - lower)
    ours = discretized_gaussian_log_likelihood(x, means, log_scales)
    torch.testing.assert_close(ours, exact, rtol=5e-3, atol=1e-4)  # tanh approximation of Phi
    assert (approx_standard_normal_cdf(torch.linspace(-4, 4, 81)) - torch.distributions.Normal(0, 1).cdf(
        torch.linspace(-4, 4, 81))).abs().max() < 1e-3


def test_loss_terms_and_gradient_routing():
    """L_simple trains the eps channels only; L_vlb trains the variance channels only (stop-gradient on the mean)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 4, 4, generator=gen).clamp(-1, 1)
    noise = torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 17, 900])
    out = torch.randn(3, 8, 4, 4, generator=gen, requires_grad=True)
    loss, terms = DiffusionLoss(SCHEDULE)(lambda x, tt: out, x0, t, noise)
    torch.testing.assert_close(terms["mse"], (out[:, :4] - noise).square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(loss, terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0
    mse_only, _ = DiffusionLoss(SCHEDULE, learn_sigma=False)(lambda x, tt: out[:, :4], x0, t, noise)
    torch.testing.assert_close(mse_only, terms["mse"])


def test_vlb_is_zero_for_the_true_posterior():
    """With the exact eps and the variance set to the posterior's, KL(q || p) vanishes at t > 0."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([5, 700])
    v = -torch.ones_like(x0)  # v = -1: log variance = log posterior variance
    loss = DiffusionLoss(SCHEDULE)
    _, terms = loss(lambda x, tt: torch.cat([noise, v], dim=1), x0, t, noise)
    assert terms["vb"].abs().max() < 1e-6
    assert math.isclose(TABLES.posterior_log_variance[0].item(), TABLES.posterior_log_variance[1].item())


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_types_round_trip_and_v_matches_diffusers(prediction):
    """The target of each prediction type converts back to the exact noise; v equals diffusers' get_velocity."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 19, 500, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    target = SCHEDULE.target(prediction, x0, t, noise)
    torch.testing.assert_close(SCHEDULE.to_eps(prediction, target, x_t, t), noise, rtol=1e-4, atol=2e-4)
    if prediction == "v":
        sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        torch.testing.assert_close(target, sched.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_v_loss_is_zero_for_a_perfect_v_network():
    """DiffusionLoss with prediction v: a network that outputs the true v (and v-channel 0) has MSE 0."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.tensor([3, 700])
    def oracle(x_t, t_, **_):
        return torch.cat([SCHEDULE.target("v", x0, t_, noise), torch.zeros_like(x0)], dim=1)
    per_sample, terms = DiffusionLoss(SCHEDULE, learn_sigma=True, prediction="v")(oracle, x0, t, noise)
    assert terms["mse"].abs().max() < 1e-10 and torch.isfinite(terms["vb"]).all()


def test_timestep_power_draws_the_stated_distribution():
    """power 1 is exactly the uniform draw PixArt trains with; power 2 has the CDF (t / T)^(1/2) (an exact property
    of floor(T u^2)), checked against the empirical CDF of 20,000 draws (the KS bound at this n is ~0.01)."""
    from common.errors import UserError
    from engine.randomness import SampleRandomness

    schedule = NoiseSchedule.linear()
    T = schedule.num_steps
    idx = torch.arange(20_000)
    uniform = DiffusionLoss(schedule).timesteps(SampleRandomness(0, 3, idx), "cpu")
    assert torch.equal(uniform, SampleRandomness(0, 3, idx).randint(T, "cpu"))
    t = DiffusionLoss(schedule, timestep_power=2.0).timesteps(SampleRandomness(0, 3, idx), "cpu")
    assert t.min() >= 0 and t.max() <= T - 1 and t.dtype == torch.long
    grid = torch.arange(0, T, 10)
    empirical = (t[None, :] < grid[:, None]).float().mean(1)
    assert (empirical - (grid / T).sqrt()).abs().max() < 0.015
    with pytest.raises(UserError, match="timestep_power"):
        DiffusionLoss(schedule, timestep_power=0.0)


def test_timestep_logit_normal_draws_the_stated_distribution():
    """floor(T sigmoid(m + s n)) < k exactly when n < (logit(k / T) - m) / s, so its CDF is the normal CDF of that;
    checked against 20,000 draws (KS bound ~0.01), and each draw uses one normal of the sample's own generator."""
    from scipy.special import logit, ndtr

    from common.errors import UserError
    from engine.randomness import SampleRandomness

    schedule = NoiseSchedule.linear()
    T = schedule.num_steps
    idx = torch.arange(20_000)
    mean, std = -0.2, 0.8
    t = DiffusionLoss(schedule, timestep_logit_normal=(mean, std)).timesteps(SampleRandomness(0, 3, idx), "cpu")
    assert t.min() >= 0 and t.max() <= T - 1 and t.dtype == torch.long
    grid = np.arange(10, T, 10)
    empirical = (t.numpy()[None, :] < grid[:, None]).mean(1)
    assert np.abs(empirical - ndtr((logit(grid / T) - mean) / std)).max() < 0.015
    assert 0.6 < ((t >= 250) & (t < 650)).float().mean() < 0.8  # the mid-noise steps get most of the draws
    for bad in ((0.0, 0.0), (0.0,), (float("nan"), 1.0)):
        with pytest.raises(UserError, match="timestep_logit_normal"):
            DiffusionLoss(schedule, timestep_logit_normal=bad)
    with pytest.raises(UserError, match="set one of them"):
        DiffusionLoss(schedule, timestep_power=2.0, timestep_logit_normal=(mean, std))


def _outline_band(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood (clipped at the border) holds both shape and background, by brute force."""
    height, width = mask.shape
    band = np.zeros_like(mask)
    for y in range(height):
        for x in range(width):
            window = mask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            band[y, x] = window.any() and not window.all()
    return band


def test_edge_weights_mark_the_outline_band_of_rendered_shapes():
    """loss_edge_weight: the pixels weighted up are exactly those next to a shape's outline in the renderer's own
    masks, by 1 + edge_weight against the rest, with mean 1 per image; a flat image keeps weight 1 everywhere."""
    from data.synthetic import ShapeObject, render, shape_mask

    objects = [ShapeObject("square", "pink", "small", 0.2, 0.25), ShapeObject("triangle", "yellow", "large", 0.7, 0.6),
               ShapeObject("cross", "blue", "medium", 0.25, 0.8)]
    image = torch.from_numpy(np.array(render(objects, 32, 32))).permute(2, 0, 1).float() / 127.5 - 1
    white = torch.ones_like(image)
    weights = DiffusionLoss(SCHEDULE, edge_weight=4.0).pixel_weights(torch.stack([image, white]))  # (2, 1, 32, 32)
    band = _outline_band(np.logical_or.reduce([shape_mask(o, 32, 32) for o in objects]))
    w = weights[0, 0].numpy()
    assert band.any() and np.array_equal(w > w.min() + 1e-6, band)
    assert w.max() / w.min() == pytest.approx(5.0) and w.mean() == pytest.approx(1.0)
    assert torch.equal(weights[1], torch.ones_like(weights[1]))
    assert DiffusionLoss(SCHEDULE).pixel_weights(image[None]) is None


def test_edge_weight_moves_the_cost_of_an_error_towards_outlines():
    """The same error costs more with the edge weight when it sits on outline pixels and less when it sits
    elsewhere; on a flat image (no edges) the weighted and plain losses are equal."""
    from common.errors import UserError
    from data.synthetic import ShapeObject, render

    image = torch.from_numpy(np.array(render([ShapeObject("circle", "red", "large", 0.5, 0.5)], 32, 32)))
    x0 = torch.stack([image.permute(2, 0, 1).float() / 127.5 - 1, torch.ones(3, 32, 32)])  # (2, 3, 32, 32)
    t, noise = torch.tensor([400, 400]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    target = SCHEDULE.target("v", x0, t, noise)
    on_edge = DiffusionLoss(SCHEDULE, edge_weight=4.0).pixel_weights(x0) > 1  # (2, 1, H, W)

    def loss(edge_weight, where):
        net = lambda x_t, t: target + 0.1 * where.float()  # noqa: E731 - exact except on `where`
        per_sample, _ = DiffusionLoss(SCHEDULE, learn_sigma=False, prediction="v", edge_weight=edge_weight)(
            net, x0, t, noise)
        return per_sample

    for where, costlier in ((on_edge, True), (~on_edge, False)):
        plain, weighted = loss(0.0, where), loss(4.0, where)
        assert (weighted[0] > plain[0] * 1.5) if costlier else (weighted[0] < plain[0] / 1.2)
        assert weighted[1] == pytest.approx(plain[1].item(), rel=1e-6)
    for bad in (-1.0, float("nan")):
        with pytest.raises(UserError, match="loss_edge_weight"):
            DiffusionLoss(SCHEDULE, edge_weight=bad)

"""Noise schedule and samplers, checked against diffusers' schedulers and against exact Gaussian-data solutions."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

from common.errors import UserError
from diffusion import (
    SAMPLERS,
    NoiseSchedule,
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
from diffusion.samplers.dpm_solver import step_order

STEPS = (1, 2, 4, 8, 14, 20)
PIXART_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SCHEDULE = NoiseSchedule.linear()


def fake_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for an epsilon network; checks the t contract on the way.

    The exact denoiser of N(0, I) data (eps = sigma_t x) plus nonlinear terms that scale with alpha_t, so the
    clean-sample estimate x0 = (x - sigma eps) / alpha stays O(1) the way a trained network's does.
    """
    assert t.dtype == torch.long and t.shape == (x.shape[0],) and t.device == x.device
    alpha, sigma = SCHEDULE.alpha_sigma(t, x)
    return sigma * x + alpha * (0.3 * torch.tanh(x) + 0.1 * x.roll(1, dims=-1))


def initial_noise(seed: int = 0) -> torch.Tensor:
    """Initial latents (2, 4, 8, 8)."""
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, x: torch.Tensor, steps: int, **step_kwargs) -> torch.Tensor:
    """The standard diffusers denoising loop around fake_denoise."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        eps = fake_denoise(model_input, t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> None:
    """Max abs difference at most tol (1e-5)."""
    err = (ours - theirs).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} exceeds {tol:.3g}"


# Noise schedule


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_schedule_matches_diffusers(name):
    ours = NoiseSchedule.from_name(name)
    start, end = (1e-4, 0.02) if name == "linear" else (0.00085, 0.012)
    theirs = DDIMScheduler(beta_schedule=name, beta_start=start, beta_end=end)
    assert ours.num_steps == 1000
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_schedule_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="linear, scaled_linear"):
        NoiseSchedule.from_name("cosine")


def test_q_sample_matches_diffusers_add_noise():
    x0, noise = initial_noise(1), initial_noise(2)
    t = torch.tensor([0, 999])
    theirs = DDIMScheduler(**PIXART_BETAS).add_noise(x0, noise, t)
    torch.testing.assert_close(SCHEDULE.q_sample(x0, t, noise), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_q_sample_eps_x0_round_trip(t):
    x0, noise = initial_noise(1).double(), initial_noise(2).double()
    ts = torch.full((2,), t)
    x_t = SCHEDULE.q_sample(x0, ts, noise)  # (2, 4, 8, 8)
    torch.testing.assert_close(SCHEDULE.eps_to_x0(x_t, ts, noise), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(SCHEDULE.x0_to_eps(x_t, ts, x0), noise, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_schedule_gathers_into_input_dtype(dtype):
    x = initial_noise().to(dtype)
    t = torch.tensor([10, 990])
    abar = SCHEDULE.alpha_bar(t, x)
    alpha, sigma = SCHEDULE.alpha_sigma(t, x)
    assert abar.shape == alpha.shape == sigma.shape == (2, 1, 1, 1)
    assert abar.dtype == alpha.dtype == sigma.dtype == dtype
    assert SCHEDULE.q_sample(x, t, x).dtype == dtype
    torch.testing.assert_close(
        alpha.double() ** 2 + sigma.double() ** 2, torch.ones(2, 1, 1, 1, dtype=torch.float64), rtol=0, atol=2e-3
    )


def test_schedule_rejects_timesteps_of_wrong_shape():
    with pytest.raises(ValueError, match=r"\(N,\)"):
        SCHEDULE.alpha_bar(torch.tensor(5), initial_noise())


# Timesteps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(steps, spacing):
    scheduler = DDIMScheduler(**PIXART_BETAS, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    ours = ddim_timesteps(steps, spacing=spacing)
    assert ours.dtype == torch.long
    assert torch.equal(ours, scheduler.timesteps)


@pytest.mark.parametrize("steps", STEPS)
def test_dpm_solver_timesteps_match_diffusers(steps):
    scheduler = DPMSolverMultistepScheduler(**PIXART_BETAS)
    scheduler.set_timesteps(steps)
    assert torch.equal(dpm_solver_timesteps(steps), scheduler.timesteps)


def test_dpm_solver_timesteps_pixart_default():
    ts = dpm_solver_timesteps(20).tolist()
    assert ts[0] == 999 and ts[1] == 949 and ts[-1] == 50 and len(ts) == 20


def test_lcm_timesteps_match_diffusers_for_every_step_count():
    scheduler = LCMScheduler(**PIXART_BETAS)
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        assert torch.equal(lcm_timesteps(steps), scheduler.timesteps), steps


def test_lcm_timesteps_reference_values():
    assert lcm_timesteps(1).tolist() == [999]
    assert lcm_timesteps(2).tolist() == [999, 499]
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(8).tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    assert lcm_timesteps(50).tolist() == list(range(999, 0, -20))


def test_dpm_solver_order_schedule():
    assert [step_order(i, 20, 3) for i in range(20)] == [1, 2] + [3] * 17 + [1]
    assert [step_order(i, 10, 3) for i in range(10)] == [1, 2] + [3] * 6 + [2, 1]
    assert [step_order(i, 10, 2) for i in range(10)] == [1] + [2] * 8 + [1]
    assert [step_order(i, 2, 3) for i in range(2)] == [1, 1]


# Trajectory parity with diffusers


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_matches_diffusers(steps, order):
    x = initial_noise()
    ours = sample_dpm_solver(fake_denoise, x, SCHEDULE, steps, order=order)
    theirs = run_diffusers(DPMSolverMultistepScheduler(**PIXART_BETAS, solver_order=order), x, steps)
    # One step returns x0 = (x - sigma eps) / alpha at t = 999 itself: float32 rounding of x - sigma eps (both
    # sides compute in float32, with coefficients rounded differently) is amplified by 1 / alpha_999 = 156.
    alpha_999 = SCHEDULE.alphas_cumprod[999].sqrt().item()
    assert_parity(ours, theirs, 1e-5 if steps > 1 else 1e-5 / alpha_999)


@pytest.mark.parametrize("start,steps", [(759, 15), (499, 10), (259, 5), (259, 1), (40, 3)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_from_a_noised_image_matches_diffusers_custom_timesteps(start, steps, order):
    # The rest of the ODE from timestep `start`: diffusers given the same descending timesteps (its `timesteps`
    # argument) runs the same multistep updates, and the grid itself is linspace(0, start) rounded.
    x = initial_noise() * SCHEDULE.alpha_sigma(torch.tensor([start]), initial_noise())[1]
    ours = sample_dpm_solver(fake_denoise, x, SCHEDULE, steps, order=order, start=start)
    grid = dpm_solver_timesteps(steps, start=start).tolist()
    assert grid[0] == start and len(set(grid)) == steps and grid == sorted(grid, reverse=True)
    scheduler = DPMSolverMultistepScheduler(**PIXART_BETAS, solver_order=order)
    scheduler.set_timesteps(timesteps=grid)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_denoise(x, t.expand(x.shape[0])), t, x).prev_sample
    assert_parity(ours, x, 1e-5 if steps > 1 else 1e-5 / SCHEDULE.alphas_cumprod[start].sqrt().item())


def test_dpm_solver_start_must_hold_the_steps():
    assert torch.equal(dpm_solver_timesteps(20, start=999), dpm_solver_timesteps(20))
    with pytest.raises(UserError, match="steps must be an integer in 1..9"):
        dpm_solver_timesteps(10, start=9)
    with pytest.raises(UserError, match="start timestep must be in 1..999"):
        dpm_solver_timesteps(4, start=1000)


@pytest.mark.parametrize("steps", [4, 14, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_heun_matches_diffusers(steps, order):
    x = initial_noise()
    ours = sample_dpm_solver(fake_denoise, x, SCHEDULE, steps, order=order, solver_type="heun")
    scheduler = DPMSolverMultistepScheduler(**PIXART_BETAS, solver_order=order, solver_type="heun")
    assert_parity(ours, run_diffusers(scheduler, x, steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_sde_dpm_solver_matches_diffusers(steps, order, solver_type):
    # Both draw each step's noise from the generator in the same order, so the same seed gives the same path.
    x = initial_noise()
    ours = sample_dpm_solver(fake_denoise, x, SCHEDULE, steps, order=order, solver_type=solver_type,
                             algorithm_type="sde-dpmsolver++", generator=torch.Generator().manual_seed(7))
    scheduler = DPMSolverMultistepScheduler(**PIXART_BETAS, solver_order=order, solver_type=solver_type,
                                            algorithm_type="sde-dpmsolver++")
    theirs = run_diffusers(scheduler, x, steps, generator=torch.Generator().manual_seed(7))
    alpha_999 = SCHEDULE.alphas_cumprod[999].sqrt().item()
    assert_parity(ours, theirs, 1e-5 if steps > 1 else 1e-5 / alpha_999)


def test_sde_dpm_solver_noise_comes_from_the_generator():
    x = initial_noise()
    run = lambda seed: sample_dpm_solver(fake_denoise, x, SCHEDULE, 8, algorithm_type="sde-dpmsolver++",  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert (run(3) - run(4)).abs().max() > 1e-2
    ode = sample_dpm_solver(fake_denoise, x, SCHEDULE, 8)
    assert (run(3) - ode).abs().max() > 1e-2


def test_dpm_solver_rejects_an_unknown_algorithm():
    with pytest.raises(ValueError, match="algorithm_type 'sde-dpmsolver'.*valid: dpmsolver\\+\\+, sde-dpmsolver\\+\\+"):
        sample_dpm_solver(fake_denoise, initial_noise(), SCHEDULE, 4, algorithm_type="sde-dpmsolver")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(steps, eta):
    x = initial_noise()
    ours = sample_ddim(fake_denoise, x, SCHEDULE, steps, eta=eta, generator=torch.Generator().manual_seed(7))
    scheduler = DDIMScheduler(**PIXART_BETAS, clip_sample=False)
    theirs = run_diffusers(scheduler, x, steps, eta=eta, generator=torch.Generator().manual_seed(7))
    assert_parity(ours, theirs)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 20])
def test_ddim_trailing_matches_diffusers_when_steps_divide_1000(steps):
    # diffusers steps from t to t - 1000 // steps; that is the next listed timestep only when steps divides 1000.
    x = initial_noise()
    ours = sample_ddim(fake_denoise, x, SCHEDULE, steps, spacing="trailing")
    scheduler = DDIMScheduler(**PIXART_BETAS, clip_sample=False, timestep_spacing="trailing")
    assert_parity(ours, run_diffusers(scheduler, x, steps))


@pytest.mark.parametrize("steps", STEPS)
def test_lcm_matches_diffusers(steps):
    x = initial_noise()
    ours = sample_lcm(fake_denoise, x, SCHEDULE, steps, generator=torch.Generator().manual_seed(3))
    theirs = run_diffusers(LCMScheduler(**PIXART_BETAS), x, steps, generator=torch.Generator().manual_seed(3))
    assert_parity(ours, theirs)


@pytest.mark.parametrize("timesteps", [[999, 639, 339, 119], [999, 119], [999, 759, 499, 259, 59]])
def test_lcm_at_given_timesteps_matches_diffusers(timesteps):
    """sample_lcm(timesteps=...) against LCMScheduler.set_timesteps(timesteps=...) (diffusers' custom schedule)."""
    x = initial_noise()
    ours = sample_lcm(fake_denoise, x, SCHEDULE, len(timesteps), timesteps=timesteps,
                      generator=torch.Generator().manual_seed(3))
    scheduler = LCMScheduler(**PIXART_BETAS)
    scheduler.set_timesteps(timesteps=timesteps)
    assert scheduler.timesteps.tolist() == timesteps
    theirs, generator = x, torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        theirs = scheduler.step(fake_denoise(theirs, t.expand(len(x))), t, theirs, generator=generator).prev_sample
    assert_parity(ours, theirs)


@pytest.mark.parametrize("timesteps, steps, text", [
    ([999, 639, 339], 4, "give 3 steps but steps is 4"),
    ([999, 339, 639, 119], 4, "strictly descending from 999"),
    ([899, 639, 339, 119], 4, "strictly descending from 999"),
    ([999, 639, 339, -1], 4, "strictly descending from 999"),
    ([999, 639.5, 339, 119], 4, "must be integers"),
])
def test_lcm_rejects_bad_given_timesteps(timesteps, steps, text):
    with pytest.raises(ValueError, match=text):
        sample_lcm(fake_denoise, initial_noise(), SCHEDULE, steps, timesteps=timesteps)
    with pytest.raises(ValueError, match=text):  # the check a config meets before anything loads
        sampler_timesteps("lcm", steps, 1000, {"timesteps": timesteps, "original_steps": 50})


def test_lcm_reusing_the_implied_noise_matches_diffusers_tcd_at_gamma_0():
    """noise_reuse=1 re-noises each estimate with the noise its x_t implies: TCD's deterministic sampling (gamma = 0,
    diffusers' TCDScheduler eta=0) at the same timesteps, state for state (TCD's last step lands at t = 0, not on
    the estimate, so the states before it are compared)."""
    timesteps = [999, 639, 339, 119]
    x = initial_noise()
    ours = []
    sample_lcm(fake_denoise, x, SCHEDULE, 4, timesteps=timesteps, noise_reuse=1.0,
               callback=lambda info: ours.append(info.x), generator=torch.Generator().manual_seed(3))
    scheduler = TCDScheduler(**PIXART_BETAS)
    scheduler.set_timesteps(timesteps=timesteps)
    theirs, states = x, []
    for t in scheduler.timesteps:
        theirs = scheduler.step(fake_denoise(theirs, t.expand(len(x))), t, theirs, eta=0.0).prev_sample
        states.append(theirs)
    for i in range(3):
        assert_parity(ours[i], states[i])


def test_lcm_noise_reuse_bounds_and_ends():
    x = initial_noise()

    def run(seed, reuse=None):
        options = {} if reuse is None else {"noise_reuse": reuse}
        return sample_lcm(fake_denoise, x, SCHEDULE, 4, generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(run(3, 0.0), run(3))  # 0 is the plain LCM sampler
    assert torch.equal(run(3, 1.0), run(4, 1.0))  # no fresh noise at all
    assert not torch.equal(run(3, 0.5), run(4, 0.5))
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="noise_reuse=.*must lie in \\[0, 1\\]"):
            run(3, bad)


# Properties


def gaussian_denoiser(mu: float, s: float):
    """Exact epsilon prediction for data x0 ~ N(mu, s^2) under SCHEDULE."""

    def denoise(x, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t, x)
        # E[x0 | x_t] = mu + s^2 alpha (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
        x0 = mu + s**2 * alpha * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
        return (x - alpha * x0) / sigma

    return denoise


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_converges_to_exact_ode_solution(solver_type):
    mu, s = 0.7, 0.6
    x_T = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    abar_T = float(SCHEDULE.alphas_cumprod[999])
    alpha_T, sigma_T = math.sqrt(abar_T), math.sqrt(1.0 - abar_T)
    # The probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed.
    exact = mu + s * (x_T - alpha_T * mu) / math.sqrt(alpha_T**2 * s**2 + sigma_T**2)
    denoise = gaussian_denoiser(mu, s)

    def error(order, steps):
        x_0 = sample_dpm_solver(denoise, x_T, SCHEDULE, steps, order=order, solver_type=solver_type)
        return (x_0 - exact).abs().max().item()

    errors = {(order, steps): error(order, steps) for order in (1, 2, 3) for steps in (5, 10, 20)}
    for order in (1, 2, 3):
        assert errors[order, 5] > errors[order, 10] > errors[order, 20], errors
    for steps in (5, 10, 20):
        assert errors[2, steps] < errors[1, steps], errors


def test_lcm_one_step_returns_denoised_estimate():
    x = initial_noise()
    t = torch.full((2,), 999)
    c_skip, c_out = lcm_boundary_scalings(999)
    x0 = SCHEDULE.eps_to_x0(x, t, fake_denoise(x, t))
    expected = c_skip * x + c_out * x0
    assert torch.equal(sample_lcm(fake_denoise, x, SCHEDULE, 1), expected)


def test_lcm_boundary_condition():
    assert lcm_boundary_scalings(0) == (1.0, 0.0)
    c_skip, c_out = lcm_boundary_scalings(999)
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25)) and c_out == pytest.approx(1.0)
    assert LCMScheduler(**PIXART_BETAS).get_scalings_for_boundary_condition_discrete(0) == (1.0, 0.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_share_signature_and_report_every_step(name):
    x = initial_noise()
    infos: list[StepInfo] = []
    out = get_sampler(name)(
        fake_denoise, x, SCHEDULE, 4, generator=torch.Generator().manual_seed(0), callback=infos.append
    )
    assert [info.index for info in infos] == [0, 1, 2, 3]
    assert all(info.total == 4 and info.denoised.shape == x.shape for info in infos)
    assert infos[0].timestep > infos[-1].timestep
    assert torch.equal(infos[-1].x, out)


def test_dpm_solver_ignores_generator_and_is_deterministic():
    x = initial_noise()
    a = sample_dpm_solver(fake_denoise, x, SCHEDULE, 8, generator=torch.Generator().manual_seed(0))
    b = sample_dpm_solver(fake_denoise, x, SCHEDULE, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# Bad inputs


def test_lcm_rejects_more_steps_than_original_schedule():
    with pytest.raises(ValueError, match="50"):
        sample_lcm(fake_denoise, initial_noise(), SCHEDULE, 51)


@pytest.mark.parametrize(
    "sampler, steps, text",
    [
        (sample_lcm, 0, r"1\.\.50"),
        (sample_ddim, 0, r"1\.\.1000"),
        (sample_ddim, 1001, r"1\.\.1000"),
        (sample_dpm_solver, 0, r"1\.\.999"),
        (sample_dpm_solver, 1000, r"1\.\.999"),
    ],
)
def test_samplers_reject_step_counts_out_of_range(sampler, steps, text):
    with pytest.raises(ValueError, match=text):
        sampler(fake_denoise, initial_noise(), SCHEDULE, steps)


def test_bad_options_are_named():
    x = initial_noise()
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        sample_ddim(fake_denoise, x, SCHEDULE, 4, spacing="uniform")
    with pytest.raises(ValueError, match="1, 2 or 3"):
        sample_dpm_solver(fake_denoise, x, SCHEDULE, 4, order=4)
    with pytest.raises(ValueError, match="midpoint, heun"):
        sample_dpm_solver(fake_denoise, x, SCHEDULE, 4, solver_type="bh2")


def test_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match="ddim, dpm, lcm"):
        get_sampler("euler")

"""diffusion/denoiser.py: prediction-type conversions against diffusers' DDPMScheduler (an independent
implementation) and against the exact forward process."""

import pytest
import torch
from diffusers import DDPMScheduler

from common.errors import UserError
from diffusion.denoiser import Denoiser
from diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()
DIFFUSERS_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def exact_net(x0: torch.Tensor, noise: torch.Tensor, prediction: str, extra_channels: bool = True):
    """A network that knows the answer: it outputs the true eps / v / x0 of x_t = q_sample(x0, t, noise), plus
    random variance channels."""
    def net(x_t, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t, x_t)
        pred = {"eps": noise, "x0": x0, "v": alpha * noise - sigma * x0}[prediction]
        return torch.cat([pred, torch.randn_like(pred)], dim=1) if extra_channels else pred
    return net


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_exact_predictions_give_back_the_truth(prediction):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    d = Denoiser(exact_net(x0, noise, prediction), SCHEDULE, prediction, torch.float64)
    alpha, sigma = SCHEDULE.alpha_sigma(t, x_t.double())
    torch.testing.assert_close(d.x0(x_t, t), x0.double(), rtol=0, atol=2e-4 if prediction == "eps" else 1e-5)
    torch.testing.assert_close(d.eps(x_t, t), noise.double(), rtol=0, atol=1e-4 if prediction == "x0" else 1e-5)
    torch.testing.assert_close(d.v(x_t, t), alpha * noise.double() - sigma * x0.double(), rtol=0, atol=1e-4)
    out = d(x_t, t)
    assert out.variance is not None and out.variance.shape == x0.shape
    assert Denoiser(exact_net(x0, noise, prediction, False), SCHEDULE, prediction)(x_t, t).variance is None


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clean_estimate_equals_diffusers_ddpm(prediction):
    """diffusers' DDPMScheduler.step computes pred_original_sample from each prediction type itself."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type=DIFFUSERS_NAMES[prediction], clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    x_t, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    for step in (999, 501, 37):
        t = torch.tensor([step])
        ours = Denoiser(lambda x, t: out, SCHEDULE, prediction).x0(x_t, t)
        theirs = scheduler.step(out, step, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_unknown_prediction_type():
    with pytest.raises(UserError, match="unknown prediction type 'score'"):
        Denoiser(lambda x, t: x, SCHEDULE, "score")
    with pytest.raises(UserError, match="unknown prediction type 'score'"):
        Denoiser(lambda x, t: x, SCHEDULE, "eps").convert(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                                          torch.tensor([5]), "score")

"""tools/handoff.py: the student's first J steps, the teacher's ODE from there. J = K is the student's own sample,
J = 0 the teacher's, and a hand-off before the last step to a one-step unguided solver of the student itself is the
student's own last step (its c_skip at t = 259 is ~1e-8): the re-noised image handed over is exactly what the
student's next step sees."""

import pytest
import torch
from conftest import random_inputs, random_model, tiny_config

from common.errors import UserError
from diffusion.schedule import NoiseSchedule
from pipeline.config import SampleConfig
from pipeline.generate import denoise_batch
from tools.handoff import handoff_latents, main

SCHEDULE = NoiseSchedule.linear()
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def nets():
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    student, teacher = (random_model(cfg, seed=s, std=0.05).eval() for s in (1, 2))
    _, _, y, mask, _ = random_inputs(cfg, batch=3, height=8, width=8)
    return student, teacher, {"y": y, "mask": mask}


def test_no_hand_off_is_the_students_sample_and_hand_off_at_zero_is_the_teachers(nets):
    student, teacher, cond = nets
    ss, ts = SampleConfig(sampler="lcm", steps=4, guidance=0.0), SampleConfig(sampler="dpm", steps=6, guidance=3.0)
    with torch.no_grad():
        own = denoise_batch(student, SCHEDULE, ss, cond, SEEDS, (8, 8))
        teachers = denoise_batch(teacher, SCHEDULE, ts, cond, SEEDS, (8, 8))
    assert torch.equal(handoff_latents(student, teacher, SCHEDULE, ss, ts, cond, SEEDS, (8, 8), 4, "eps"), own)
    assert torch.equal(handoff_latents(student, teacher, SCHEDULE, ss, ts, cond, SEEDS, (8, 8), 0, "eps"), teachers)
    mixed = handoff_latents(student, teacher, SCHEDULE, ss, ts, cond, SEEDS, (8, 8), 2, "eps")
    assert not torch.allclose(mixed, own) and not torch.allclose(mixed, teachers)


@pytest.mark.parametrize("options, solver_steps", [
    ({}, 4),  # LCM's picks: the last step from 259, round(4 * 259 / 999) = 1 solver step
    ({"timesteps": [999, 759, 499, 119]}, 8),  # given timesteps: the last from 119, round(8 * 119 / 999) = 1
])
def test_handing_the_last_step_to_the_student_itself_gives_its_own_sample(nets, options, solver_steps):
    student, _, cond = nets
    ss = SampleConfig(sampler="lcm", steps=4, guidance=0.0, sampler_options=options)
    ts = SampleConfig(sampler="dpm", steps=solver_steps, guidance=1.0)
    full = handoff_latents(student, student, SCHEDULE, ss, ts, cond, SEEDS, (8, 8), 4, "eps")
    handed = handoff_latents(student, student, SCHEDULE, ss, ts, cond, SEEDS, (8, 8), 3, "eps")
    torch.testing.assert_close(handed, full, rtol=1e-5, atol=1e-5)


def test_bad_hand_offs_are_refused(nets, caplog):
    student, teacher, cond = nets
    ss = SampleConfig(sampler="lcm", steps=2, guidance=0.0)
    with pytest.raises(UserError, match="the hand-off is after 0..2 of them"):
        handoff_latents(student, teacher, SCHEDULE, ss, SampleConfig(sampler="dpm"), cond, SEEDS, (8, 8), 3, "eps")
    with pytest.raises(UserError, match="use --teacher-set sample.sampler=dpm"):
        handoff_latents(student, teacher, SCHEDULE, ss, SampleConfig(sampler="ddim"), cond, SEEDS, (8, 8), 1, "eps")
    code = main(["--student-config", "shapes_teacher", "--teacher-config", "shapes_teacher", "--handoff", "1"])
    assert code == 2 and "the hand-off follows its LCM steps" in caplog.text
    code = main(["--student-config", "lcm_shapes", "--teacher-config", "shapes_teacher", "--handoff", "0", "9"])
    assert code == 2 and "--handoff 9: the student draws 4 steps" in caplog.text

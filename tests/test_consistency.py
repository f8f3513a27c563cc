"""Latent consistency distillation: the objective against diffusers' schedulers and exact properties, and the
LCD trainer on the shared loop (teacher and target untouched by gradients, exact resume, DDP, learning)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, random_inputs, random_model, tiny_config
from diffusers import DDIMScheduler, LCMScheduler
from safetensors.torch import load_file
from toy_training import ToyLatents, last_state, toy_config, toy_data

from common.errors import UserError
from diffusion.config import DistillConfig
from diffusion.consistency import ConsistencyDistillationLoss
from diffusion.samplers.lcm import consistency_function, lcm_boundary_scalings
from diffusion.schedule import NoiseSchedule
from engine.loop import train
from engine.randomness import SampleRandomness
from engine.state import ResumeError, latest_checkpoint, read_training_state
from models.checkpoint import load_checkpoint, save_checkpoint
from tasks.lcd import LCMTask

TESTS = Path(__file__).resolve().parent
SCHEDULE = NoiseSchedule.linear()
PIXART_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def net(scale: float):
    """A fixed nonlinear stand-in network: out = scale * tanh(x) + t / 1000 + the caption's mean."""
    def forward(x, t, y=None, mask=None, drop_caption=None, guidance=None):
        bias = y.mean(dim=(1, 2)) if drop_caption is None else torch.where(drop_caption, 0.0, y.mean(dim=(1, 2)))
        return scale * torch.tanh(x) + (t.float() / 1000 + bias).view(-1, 1, 1, 1)
    return forward


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_boundary_condition_f_x_0_is_x(prediction):
    """f(x, t = 0) = x exactly, whatever the network says (c_skip(0) = 1, c_out(0) = 0)."""
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(consistency_function(x, torch.randn_like(x) * 100, torch.zeros(3, dtype=torch.long)), x)
    loss = ConsistencyDistillationLoss(SCHEDULE, prediction)
    y = torch.randn(3, 5, 8)
    torch.testing.assert_close(loss.f(net(7.0), x, torch.zeros(3, dtype=torch.long), {"y": y}), x, rtol=0, atol=1e-6)


def test_boundary_scalings_match_diffusers_lcm():
    sched = LCMScheduler(**PIXART_BETAS, timestep_scaling=10.0)
    t = torch.tensor([0, 19, 259, 999])
    ours = lcm_boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert float(ours[0][i]) == pytest.approx(float(c_skip), rel=1e-6)
        assert float(ours[1][i]) == pytest.approx(float(c_out), rel=1e-6)


def test_guided_teacher_step_equals_diffusers_ddim_step():
    """Per-sample timesteps and guidance: each sample's step equals DDIMScheduler.step on its guided eps."""
    loss = ConsistencyDistillationLoss(SCHEDULE, "eps")
    gen = torch.Generator().manual_seed(0)
    n = torch.tensor([0, 1, 17, 49])
    t_start, t_end = loss.timesteps(n)
    assert t_start.tolist() == [19, 39, 359, 999] and t_end.tolist() == [0, 19, 339, 979]
    z = torch.randn(4, 4, 8, 8, generator=gen)
    y = torch.randn(4, 5, 8, generator=gen)
    w = torch.tensor([0.0, 3.5, 4.5, 12.0])
    keep = torch.zeros(4, dtype=torch.bool)
    teacher = net(0.7)
    cond, uncond = {"y": y, "drop_caption": keep}, {"y": y, "drop_caption": ~keep}
    ours = loss.teacher_step(teacher, z, t_start, t_end, w, cond, uncond)
    sched = DDIMScheduler(**PIXART_BETAS, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(50)
    for i in range(4):
        eps_c = teacher(z[i:i + 1], t_start[i:i + 1], y=y[i:i + 1], drop_caption=keep[i:i + 1])
        eps_u = teacher(z[i:i + 1], t_start[i:i + 1], y=y[i:i + 1], drop_caption=~keep[i:i + 1])
        guided = eps_c + w[i] * (eps_c - eps_u)  # the LCM papers' w
        expected = sched.step(guided, int(t_start[i]), z[i:i + 1]).prev_sample
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-5, atol=1e-5)


def test_two_teacher_substeps_equal_two_diffusers_ddim_steps():
    """distill.teacher_substeps=2 solves each skip of 20 in two guided DDIM steps of 10: diffusers' DDIMScheduler
    with 100 inference steps (stride 10) applied twice, guiding at each step."""
    loss = ConsistencyDistillationLoss(SCHEDULE, "eps", teacher_substeps=2)
    gen = torch.Generator().manual_seed(3)
    t_start, t_end = loss.timesteps(torch.tensor([0, 1, 24, 49]))
    z = torch.randn(4, 4, 8, 8, generator=gen)
    y = torch.randn(4, 5, 8, generator=gen)
    w = torch.tensor([1.0, 3.5, 4.5, 7.0])
    keep = torch.zeros(4, dtype=torch.bool)
    teacher = net(0.4)
    cond, uncond = {"y": y, "drop_caption": keep}, {"y": y, "drop_caption": ~keep}
    ours = loss.teacher_step(teacher, z, t_start, t_end, w, cond, uncond)
    sched = DDIMScheduler(**PIXART_BETAS, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(100)
    for i in range(4):
        x, t = z[i:i + 1], int(t_start[i])
        for _ in range(2):
            tt = torch.tensor([t])
            eps_c = teacher(x, tt, y=y[i:i + 1], drop_caption=keep[i:i + 1])
            eps_u = teacher(x, tt, y=y[i:i + 1], drop_caption=~keep[i:i + 1])
            x = sched.step(eps_c + w[i] * (eps_c - eps_u), t, x).prev_sample
            t -= 10
        torch.testing.assert_close(ours[i:i + 1], x, rtol=1e-5, atol=1e-5)


def test_huber_and_l2_losses_and_grid_errors():
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(x0)
    n, w = torch.tensor([3, 40]), torch.tensor([4.5, 4.5])
    y = torch.randn(2, 5, 8)
    cond = {"y": y, "drop_caption": torch.zeros(2, dtype=torch.bool)}
    uncond = {"y": y, "drop_caption": torch.ones(2, dtype=torch.bool)}
    student, teacher = net(0.5), net(0.6)
    huber, _ = ConsistencyDistillationLoss(SCHEDULE, "eps", loss="huber", huber_c=0.001)(
        student, student, teacher, x0, noise, n, w, cond, uncond)
    l2, terms = ConsistencyDistillationLoss(SCHEDULE, "eps", loss="l2")(student, student, teacher, x0, noise, n, w,
                                                                         cond, uncond)
    d = terms["distance"]  # rms distance; huber ~ mean |d| - c for |d| >> c, l2 = mean d^2
    assert torch.all(huber > 0) and torch.allclose(l2, d**2, rtol=1e-5)
    assert torch.all(huber <= d + 1e-6)
    with pytest.raises(ValueError, match="does not divide|divides"):
        ConsistencyDistillationLoss(SCHEDULE, "eps", ddim_steps=30)


@pytest.mark.parametrize("change,message", [
    ({"teacher": None}, "distill.teacher is not set"),
    ({"ddim_steps": 30}, "does not divide the 1000-step schedule"),
    ({"guidance_embedding": True, "w_min": 9.0, "w_max": 3.0}, "w_min=9.0 > distill.w_max=3.0"),
    ({"lora_alpha": 16.0}, "lora_alpha is set on a full-distillation config"),
    ({"loss": "l1"}, "distill.loss must be one of huber, l2"),
    ({"teacher_substeps": 0}, "distill.teacher_substeps must be in 1..20"),
    ({"teacher_substeps": 21}, "distill.teacher_substeps must be in 1..20"),
    ({"target_decay_start": 0.95}, "target_decay_ramp \\(0\\) and distill.target_decay_start \\(0.95\\) go together"),
    ({"target_decay_ramp": 100}, "go together"),
    ({"target_decay_start": 1.0, "target_decay_ramp": 100}, "target_decay_start must be in \\[0, 1\\)"),
])
def test_distill_config_errors(change, message):
    with pytest.raises(UserError, match=message):
        DistillConfig(**{"teacher": "t.safetensors", **change}).check(1000)


def test_target_rate_ramp_grows_the_horizon_geometrically():
    """mu from 0.95 (horizon 20 steps) to 0.995 (200) over 4 steps: half way the horizon is their geometric mean
    (sqrt(20 * 200)); from the ramp's end on, and without a ramp, mu is target_decay."""
    ramp = DistillConfig(teacher="t", target_decay=0.995, target_decay_start=0.95, target_decay_ramp=4)
    assert ramp.target_rate(0) == pytest.approx(0.95)
    assert 1 / (1 - ramp.target_rate(2)) == pytest.approx((20 * 200) ** 0.5)
    assert ramp.target_rate(4) == ramp.target_rate(10) == 0.995
    assert [round(ramp.target_rate(i), 6) for i in range(5)] == sorted(round(ramp.target_rate(i), 6) for i in range(5))
    assert DistillConfig(teacher="t", target_decay=0.99).target_rate(0) == 0.99


# ----------------------------------------------------------------------------------------------------------
# The trainer


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A random 'teacher' matching the toy config (tests/toy_training.py), as this project's safetensors."""
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint(random_model(cfg, seed=3, std=0.05).state_dict(), cfg, path, "safetensors")
    return path


def lcm_config(runs, teacher, *overrides):
    return toy_config(runs, f"distill.teacher={teacher}", "train.ema_decay=0", "train.lr=1e-3", *overrides)


def test_zero_initialised_students_equal_the_teacher(teacher_file):
    teacher, _, _ = load_checkpoint(teacher_file)
    cfg0 = toy_config("unused")
    x, t, y, mask, _ = random_inputs(tiny_config(caption_channels=32, caption_tokens=8, latent_size=8), height=8,
                                     width=8)
    with torch.no_grad():
        ref = teacher.eval()(x, t, y, mask)
        for overrides, kw in ((["distill.lora_rank=4"], {}), (["distill.guidance_embedding=true"],
                                                             {"guidance": torch.tensor([3.0, 9.0])})):
            task = LCMTask(toy_config("unused", f"distill.teacher={teacher_file}", *overrides), torch.device("cpu"))
            assert torch.equal(task.model.eval()(x, t, y, mask, **kw), ref), overrides
    assert cfg0.distill.lora_rank == 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_step_changes_only_the_student_and_the_target_by_its_ema(teacher_file, tmp_path, lora):
    cfg = lcm_config(tmp_path, teacher_file, *(["distill.lora_rank=4"] if lora else []))
    task = LCMTask(cfg, torch.device("cpu"))
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(4)])
    teacher_before = {k: v.clone() for k, v in (task.model if lora else task.teacher).state_dict().items()
                      if "lora_" not in k}
    target_before = {k: v.clone() for k, v in task.target.shadow.items()}
    opt = torch.optim.SGD([p for g in task.parameter_groups() for p in g["params"]], lr=0.1)
    loss, _ = task.loss(task.model, batch, SampleRandomness(0, 0, batch["index"]))
    loss.backward()
    teacher_params = [p for n, p in task.model.named_parameters() if "lora_" not in n] if lora else \
        list(task.teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)
    assert all(t.grad is None and not t.requires_grad for t in task.target.shadow.values())
    opt.step()
    task.after_step(task.model)
    teacher_now = (task.model if lora else task.teacher).state_dict()
    assert all(torch.equal(teacher_now[k], v) for k, v in teacher_before.items())  # frozen, bit for bit
    student = dict(task.model.named_parameters())
    changed = 0
    for name, shadow in task.target.shadow.items():
        expected = 0.95 * target_before[name] + 0.05 * student[name].detach()
        torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-7)
        changed += not torch.equal(shadow, target_before[name])
    assert changed > 0


@pytest.mark.parametrize("ramp", [(), ("distill.target_decay_start=0.5", "distill.target_decay_ramp=3")],
                         ids=["constant-mu", "mu-ramp"])
def test_lcd_resume_equals_uninterrupted_run_and_refuses_another_teacher(teacher_file, tmp_path, ramp):
    common = ("train.steps=4", "train.checkpoint_every=2", *ramp)
    straight = train(lcm_config(tmp_path / "a", teacher_file, *common), LCMTask, toy_data)
    first = train(lcm_config(tmp_path / "b", teacher_file, "train.steps=2", "train.checkpoint_every=2", *ramp),
                  LCMTask, toy_data)
    resumed = train(lcm_config(tmp_path / "b", teacher_file, *common), LCMTask, toy_data, resume=str(first))
    a, b = (last_state(r) for r in (straight, resumed))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    for key in a["task"]["target"]["shadow"]:
        torch.testing.assert_close(a["task"]["target"]["shadow"][key], b["task"]["target"]["shadow"][key],
                                   rtol=0, atol=1e-6)
    assert a["references"]["teacher"]["sha256"] == b["references"]["teacher"]["sha256"]
    other = tmp_path / "other.safetensors"
    teacher, cfg, _ = load_checkpoint(teacher_file)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    save_checkpoint(state, cfg, other, "safetensors")
    with pytest.raises(ResumeError, match="(?s)frozen networks it was trained against changed:.*teacher"):
        train(lcm_config(tmp_path / "b", other, "train.steps=6"), LCMTask, toy_data, resume=str(resumed))


def test_a_guidance_input_student_exports_from_its_training_checkpoint(teacher_file, tmp_path):
    """tools/training_curve.py exports every kept checkpoint: a student with a w input must come out as one."""
    run = train(lcm_config(tmp_path, teacher_file, "distill.guidance_embedding=true", "train.steps=2",
                           "train.checkpoint_every=2"), LCMTask, toy_data)
    state = read_training_state(latest_checkpoint(run), "model")
    assert state.config.guidance_embedding and "w_embedder.proj.weight" in state.state_dict
    save_checkpoint(state.state_dict, state.config, tmp_path / "step.safetensors", "safetensors")
    model, cfg, _ = load_checkpoint(tmp_path / "step.safetensors")
    final, _, _ = load_checkpoint(run / "weights.safetensors")  # what the run itself exported at its last step
    assert cfg.guidance_embedding and model.guidance_embedding
    for key, value in final.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_lora_checkpoints_hold_adapters_not_the_frozen_weights(teacher_file, tmp_path):
    run = train(lcm_config(tmp_path, teacher_file, "distill.lora_rank=4", "train.steps=2"), LCMTask, toy_data)
    state = last_state(run)
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert all(".lora_" in k for k in state["task"]["target"]["shadow"])
    model, cfg, _ = load_checkpoint(run / "weights.safetensors")  # the exported student: LoRA folded in
    assert not any("lora" in k for k in model.state_dict())
    adapters = load_file(run / "weights.lora.safetensors")  # and the adapters alone, in diffusers' peft layout
    assert adapters and all(k.startswith("transformer_blocks.") and ".lora_" in k for k in adapters)


def test_an_fp16_teacher_file_distils_in_fp32(tmp_path):
    """Shipped weights are fp16 (weights/shapes/); the teacher and the student it starts run in fp32."""
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    path = tmp_path / "teacher16.safetensors"
    save_checkpoint({k: v.half() for k, v in random_model(cfg, seed=3, std=0.05).state_dict().items()}, cfg, path,
                    "safetensors")
    task = LCMTask(lcm_config(tmp_path, path), torch.device("cpu"))
    assert {p.dtype for p in task.model.parameters()} == {p.dtype for p in task.teacher.parameters()} == {torch.float32}
    assert math.isfinite(fixed_batch_loss(task))


def fixed_batch_loss(task) -> float:
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(8)])
    with torch.no_grad():
        return task.loss(task.model, batch, SampleRandomness(123, 0, batch["index"]))[0].item()


def test_a_short_distillation_lowers_the_loss(teacher_file, tmp_path):
    cfg = lcm_config(tmp_path, teacher_file, "train.steps=80", "train.checkpoint_every=80", "train.warmup_steps=1",
                     "train.lr=3e-4")
    task = LCMTask(cfg, torch.device("cpu"))
    before = fixed_batch_loss(task)
    run = train(cfg, LCMTask, toy_data)
    state = last_state(run)
    task.model.load_state_dict(state["model"])
    task.load_state_dict(state["task"])
    after = fixed_batch_loss(task)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_two_process_lcd_equals_one_process(teacher_file, tmp_path):
    # adam_eps 1e-6 (not 1e-8): see the comparison below.
    common = (f"distill.teacher={teacher_file}", "train.ema_decay=0", "train.lr=3e-4", "train.steps=3",
              "train.checkpoint_every=3", "train.adam_eps=1e-6")
    one = train(toy_config(tmp_path / "one", "train.batch_size=4", *common), LCMTask, toy_data)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(TESTS / "toy_train_run.py"), str(tmp_path / "two"), "--task", "lcm",
                          "train.batch_size=2", *common], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (two,) = (tmp_path / "two").iterdir()
    a, b = (last_state(r) for r in (one, two))
    # The toy teacher's consistency gradients are large (norm ~10-60, clipped to 1), so float32 summation-order
    # differences between the all-reduce and one process show up; Adam normalises each parameter's step, so for
    # parameters whose gradient is nearly zero that noise can move them by up to lr per step. How large that noise
    # is depends on the CPU's kernels: with adam_eps 1e-8 an Intel Xeon gave 2.1e-4 on t_block.1.bias where an AMD
    # EPYC gave ~1e-5. adam_eps 1e-6 damps the steps of gradients under ~1e-6 (rounding noise, not the gradient
    # sync this test is about); the gap is then under 1e-5 on both.
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=5e-5)

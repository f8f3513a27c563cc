"""Distribution matching distillation (diffusion/dmd.py, tasks/dmd.py, train/train_dmd.py): the generator's gradient,
multi-step generation against the LCM sampler, the two time-scale update rule in the shared loop, exact resume,
and every refusal before anything loads."""

import re

import numpy as np
import pytest
import torch
from conftest import load_script, random_inputs, random_model, tiny_config
from safetensors.torch import load_file
from toy_training import ToyLatents, last_state, toy_config, toy_data

from common.errors import UserError
from configs.loader import save_config
from data.features import batch_conditions
from data.pairs import load_pairs, read_pairs_metadata
from diffusion.dmd import (
    DistributionMatching,
    FakeScore,
    TeacherFeatures,
    gan_generator_loss,
    gan_head_loss,
    regression_distance,
)
from diffusion.guidance import null_caption_pair
from diffusion.samplers.lcm import sample_lcm
from diffusion.schedule import NoiseSchedule
from engine.loop import train
from engine.randomness import SampleRandomness
from models.checkpoint import load_checkpoint, peek, save_checkpoint
from tasks.dmd import DMDTask
from tools.make_ode_pairs import main as make_pairs_main

SCHEDULE = NoiseSchedule.linear()
dmd_main = load_script("train/train_dmd.py").main


def toy_net(seed: int):
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    return random_model(cfg, seed=seed, std=0.05), cfg


def conditions(cfg, n=3):
    x, t, y, mask, _ = random_inputs(cfg, batch=n, height=8, width=8)
    return x, {"y": y, "mask": mask}


def test_equal_scores_give_no_gradient_and_the_loss_gradient_is_the_matching_gradient():
    """With the fake score equal to the (unguided) real score the generator gets exactly no gradient; otherwise
    d loss / dx is grad / (C H W), the normalised difference of the two clean estimates."""
    net, cfg = toy_net(0)
    other, _ = toy_net(1)
    x_gen, cond = conditions(cfg)
    x = x_gen.clone().requires_grad_(True)
    t, noise = torch.tensor([100, 500, 900]), torch.randn_like(x_gen)
    objective = DistributionMatching(SCHEDULE, real_guidance=1.0)
    c, u = null_caption_pair(cond)
    loss, _ = objective.generator_loss(x, net, net, t, noise, c, u)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    loss, _ = objective.generator_loss(x, net, other, t, noise, c, u)
    loss.sum().backward()
    with torch.no_grad():
        x_t = SCHEDULE.q_sample(x_gen, t, noise)
        grad = objective.matching_gradient(x_gen, objective.real_x0(net, x_t, t, c, u), objective.x0(other, x_t, t, c))
    torch.testing.assert_close(x.grad, grad / x_gen[0].numel(), rtol=1e-5, atol=1e-8)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("t", [50, 500, 950])
def test_a_descent_step_moves_samples_from_the_fake_estimate_toward_the_real_one(t):
    """The sign and the normalisation: an x0-predicting real score that always answers `data` and a fake score that
    answers the generated samples themselves (a fake score that has learnt G's distribution); one SGD step on the
    DMD loss must move every sample toward `data`, by lr / (C H W) x (x - data) / mean |x - data| exactly."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(3, 4, 8, 8, generator=gen)
    x_gen = torch.randn(3, 4, 8, 8, generator=gen)
    real = lambda x, t, **cond: data  # noqa: E731
    fake = lambda x, t, **cond: x_gen  # noqa: E731
    objective = DistributionMatching(SCHEDULE, prediction="x0", real_guidance=1.0)
    x = x_gen.clone().requires_grad_(True)
    loss, _ = objective.generator_loss(x, real, fake, torch.full((3,), t), torch.randn_like(x_gen), {}, {})
    loss.sum().backward()
    lr = 0.1 * x_gen[0].numel()
    stepped = x_gen - lr * x.grad
    before, after = (x_gen - data).flatten(1).norm(dim=1), (stepped - data).flatten(1).norm(dim=1)
    assert (after < before).all()
    scale = (x_gen - data).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(stepped, x_gen - 0.1 * (x_gen - data) / scale, rtol=1e-4, atol=1e-4)


def test_multi_step_generation_equals_the_lcm_sampler():
    """generate() with every sample to its last step is LCM multistep sampling with the same noise (the boundary
    scaling c_skip(t) at t >= 499 is below 1e-8, so the consistency function is the x0 estimate)."""
    net, cfg = toy_net(2)
    noise, cond = conditions(cfg, n=2)
    for steps in (1, 2, 4):
        objective = DistributionMatching(SCHEDULE, generator_steps=steps)
        gen = torch.Generator().manual_seed(9)
        fresh = [torch.randn(noise.shape, generator=gen) for _ in range(steps - 1)]
        with torch.no_grad():
            ours, _ = objective.generate(net, noise, cond, fresh)
            eps = lambda x, t: net(x, t, **cond)[:, :4]  # noqa: E731
            theirs = sample_lcm(eps, noise, SCHEDULE, steps, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_generator_at_given_timesteps_is_the_lcm_sampler_at_them():
    net, cfg = toy_net(2)
    noise, cond = conditions(cfg, n=2)
    objective = DistributionMatching(SCHEDULE, generator_steps=3, explicit_timesteps=[999, 339, 119])
    assert objective.timesteps.tolist() == [999, 339, 119]
    gen = torch.Generator().manual_seed(9)
    fresh = [torch.randn(noise.shape, generator=gen) for _ in range(2)]  # as the sampler draws its re-noising
    seen = []
    with torch.no_grad():
        ours, _ = objective.generate(net, noise, cond, fresh)

        def eps(x, t):
            seen.append(int(t[0]))
            return net(x, t, **cond)[:, :4]

        theirs = sample_lcm(eps, noise, SCHEDULE, 3, timesteps=[999, 339, 119],
                            generator=torch.Generator().manual_seed(9))
    assert seen == [999, 339, 119]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_backward_simulation_stops_each_sample_at_its_step():
    net, cfg = toy_net(3)
    noise, cond = conditions(cfg, n=3)
    objective = DistributionMatching(SCHEDULE, generator_steps=2)
    fresh = [torch.randn_like(noise)]
    with torch.no_grad():
        one, _ = DistributionMatching(SCHEDULE, generator_steps=1).generate(net, noise, cond, [])
        both, _ = objective.generate(net, noise, cond, fresh)
        mixed, inputs = objective.generate(net, noise, cond, fresh, stop=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(mixed[[0, 2]], one[[0, 2]])
    torch.testing.assert_close(mixed[1], both[1])
    assert torch.equal(inputs[0], noise[0]) and not torch.equal(inputs[1], noise[1])


def test_gan_losses_are_the_non_saturating_ones():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(gan_generator_loss(logits), torch.log1p(torch.exp(-logits)))
    torch.testing.assert_close(gan_head_loss(logits, -logits), 2 * torch.log1p(torch.exp(-logits)))


def test_the_gan_terms_noise_levels_stop_at_gan_t_max():
    objective = DistributionMatching(SCHEDULE, t_min=0.02, t_max=0.98)
    u = torch.tensor([0.0, 0.5, 0.999])
    assert objective.noise_levels(u).tolist() == [20, 500, 979]
    assert objective.noise_levels(u, 0.3).tolist() == [20, 160, 299]


def test_per_token_gan_losses_are_each_images_mean_over_its_tokens():
    """A patch discriminator's logits (N, T): each image's loss is the mean of its tokens' losses, so an image
    judged real on every token but one is charged for that one token alone."""
    logits = torch.tensor([[-2.0, 0.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    per_token = torch.log1p(torch.exp(-logits))
    torch.testing.assert_close(gan_generator_loss(logits), per_token.mean(dim=1))
    torch.testing.assert_close(gan_head_loss(logits, -logits), 2 * per_token.mean(dim=1))
    assert gan_generator_loss(logits).shape == (2,)


def test_the_gan_head_reads_one_logit_per_image_or_per_token():
    """Per-token logits, one per patch; with a linear head (which commutes with the mean) their mean over the tokens
    is exactly the pooled head's logit."""
    net, cfg = toy_net(2)
    noise, cond = conditions(cfg, n=3)
    t = torch.tensor([10, 500, 900])
    pooled, patches = FakeScore(net, gan_head=True), FakeScore(net, gan_head=True, pool="tokens")
    linear = torch.nn.Linear(net.hidden_size, 1)
    pooled.head, patches.head = linear, linear
    tokens = (noise.shape[-1] // cfg.patch_size) * (noise.shape[-2] // cfg.patch_size)
    with torch.no_grad():
        one, each = pooled.logits(noise, t, **cond), patches.logits(noise, t, **cond)
    assert one.shape == (3,) and each.shape == (3, tokens)
    torch.testing.assert_close(each.mean(dim=1), one)
    assert each.std(dim=1).min() > 1e-4  # the patches are judged apart


def test_the_regression_distance_edge_term_charges_disagreeing_edges_only():
    """A difference flat in space has no edge term; a checkerboard difference of amplitude a has neighbouring-pixel
    differences of 2a everywhere (squared: 4a^2 across and down), so its distance is a^2 (1 + 4 w)."""
    target = torch.randn(3, 2, 8, 8)
    flat = target + torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1)
    for w in (0.0, 3.0):
        torch.testing.assert_close(regression_distance(flat, target, w), torch.tensor([0.25, 1.0, 4.0]))
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1.0  # +-1
    a = torch.tensor([0.1, 0.5, 2.0]).view(3, 1, 1, 1)
    moved = target + a * checker
    for w in (0.0, 0.5, 3.0):
        torch.testing.assert_close(regression_distance(moved, target, w), a.flatten() ** 2 * (1 + 4 * w))
    # one inner pixel of a 4x4 image off by 1: 1/16 squared; 2 of the 12 horizontal and 2 of the 12 vertical
    # neighbour pairs change by 1, so the edge term is w (2/12 + 2/12) / 2
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 1, 1] = 1.0
    torch.testing.assert_close(regression_distance(one, torch.zeros_like(one), 2.0),
                               torch.tensor([1 / 16 + 2.0 * (2 / 12 + 2 / 12) / 2]))


def test_the_teacher_feature_distance_is_the_cosine_distance_of_its_block_outputs():
    """Against the blocks' outputs read with torch's own forward hooks (not the model's block_hook) and the identity
    |a/|a| - b/|b||^2 = 2 - 2 cos(a, b): the mean over blocks and tokens, times the weight; zero for equal images;
    the gradient reaches the image and not the frozen teacher."""
    net, cfg = toy_net(5)
    net.requires_grad_(False)
    x, cond = conditions(cfg, n=3)
    target = x + 0.3 * torch.randn_like(x)
    t, noise = torch.tensor([0, 120, 290]), torch.randn_like(x)
    outputs = []
    handles = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in net.blocks]
    with torch.no_grad():
        net(SCHEDULE.q_sample(x, t, noise), t, **cond)
        net(SCHEDULE.q_sample(target, t, noise), t, **cond)
    for h in handles:
        h.remove()
    k = len(net.blocks)
    cos = torch.stack([torch.nn.functional.cosine_similarity(outputs[i], outputs[k + i], dim=-1) for i in range(k)])
    expected = 2.5 * (2 - 2 * cos).mean(dim=(0, 2))  # (blocks, N, T) -> (N,)
    image = x.clone().requires_grad_(True)
    features = TeacherFeatures(net, t, noise, weight=2.5)
    got = features.distance(SCHEDULE, image, target, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (got > 0).all()
    got.sum().backward()
    assert image.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(features.distance(SCHEDULE, target, target, cond), torch.zeros(3), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The trainer


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    net, cfg = toy_net(4)
    path = tmp_path_factory.mktemp("dmd-teacher") / "teacher.safetensors"
    save_checkpoint(net.state_dict(), cfg, path, "safetensors")
    return path


def dmd_config(runs, teacher, *overrides):
    return toy_config(runs, f"dmd.teacher={teacher}", "dmd.fake_updates=2", "dmd.real_guidance=2", "train.lr=1e-3",
                      "dmd.fake_lr=2e-3", *overrides)


def test_one_training_step_updates_fake_score_k_times_and_generator_once(teacher_file, tmp_path):
    run = train(dmd_config(tmp_path, teacher_file, "train.steps=1", "train.checkpoint_every=1"), DMDTask, toy_data)
    state = last_state(run, "fake_score")
    generator = last_state(run, "generator")
    assert state["optimizer"]["state"][0]["step"] == 2 and generator["optimizer"]["state"][0]["step"] == 1
    assert state["updates"] == 3 and state["batches_consumed"] == 3
    teacher, _, _ = load_checkpoint(teacher_file)
    exported, _, _ = load_checkpoint(run / "ema.safetensors")
    moved = max((exported.state_dict()[k].float() - v.float()).abs().max().item()
                for k, v in teacher.state_dict().items())
    assert moved > 0  # the generator trained away from the teacher it started as


def test_generator_and_fake_score_start_as_the_teacher(teacher_file, tmp_path):
    task = DMDTask(dmd_config(tmp_path, teacher_file), torch.device("cpu"))
    teacher, cfg = toy_net(4)
    x, t, y, mask, _ = random_inputs(cfg, height=8, width=8)
    with torch.no_grad():
        ref = teacher(x, t, y, mask)
        assert torch.equal(task.generator(x, t, y, mask), ref) and torch.equal(task.fake(x, t, y, mask), ref)
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(4)])
    loss, terms = task.update("generator", task.generator, batch, SampleRandomness(0, 0, batch["index"]))
    assert torch.isfinite(loss) and terms["dmd_grad_norm"] > 0  # guided real score vs unguided fake: a gradient


def test_generator_init_starts_the_generator_elsewhere_and_is_recorded(teacher_file, tmp_path, caplog):
    """dmd.generator_init (e.g. the LCD student): the generator starts as that checkpoint, the fake score still as the
    teacher, and the checkpoint names both; one of another architecture is refused before anything loads."""
    student, cfg = toy_net(7)
    path = tmp_path / "student.safetensors"
    save_checkpoint(student.state_dict(), cfg, path, "safetensors")
    task = DMDTask(dmd_config(tmp_path, teacher_file, f"dmd.generator_init={path}"), torch.device("cpu"))
    teacher, _ = toy_net(4)
    x, t, y, mask, _ = random_inputs(cfg, height=8, width=8)
    with torch.no_grad():
        assert torch.equal(task.generator(x, t, y, mask), student(x, t, y, mask))
        assert torch.equal(task.fake(x, t, y, mask), teacher(x, t, y, mask))
    assert task.references()["generator_init"]["path"] == str(path)
    other = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8, hidden_size=64)
    wide = tmp_path / "other.safetensors"
    save_checkpoint(random_model(other, seed=1).state_dict(), other, wide, "safetensors")
    code, runs = run_cli(tmp_path, "--set", f"dmd.teacher={teacher_file}", "--set", f"dmd.generator_init={wide}")
    assert code == 2 and runs == [] and "is not of the teacher's architecture" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("gan", [None, "mean", "tokens"], ids=["dmd", "dmd+gan", "dmd+patch-gan"])
def test_dmd_resume_equals_uninterrupted_run(teacher_file, tmp_path, gan):
    extra = ["dmd.gan_weight=1e-2", "dmd.generator_steps=2", f"dmd.gan_pool={gan}"] if gan else []
    straight = train(dmd_config(tmp_path / "a", teacher_file, *extra), DMDTask, toy_data)
    first = train(dmd_config(tmp_path / "b", teacher_file, "train.steps=3", *extra), DMDTask, toy_data)
    resumed = train(dmd_config(tmp_path / "b", teacher_file, *extra), DMDTask, toy_data, resume=str(first))
    for network in ("generator", "fake_score"):
        a, b = last_state(straight, network), last_state(resumed, network)
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("matching", [1, 2])
def test_matching_steps_puts_the_dmd_term_on_the_first_steps_outputs_only(teacher_file, tmp_path, monkeypatch,
                                                                           matching):
    """dmd.matching_steps=m: the samples that the DMD term and the fake score see are outputs of the generator's first
    m steps; with m=1, exactly its one step from the noise (the same draws as without the setting)."""
    task = DMDTask(dmd_config(tmp_path, teacher_file, "dmd.generator_steps=4", f"dmd.matching_steps={matching}"),
                   torch.device("cpu"))
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(16)])
    cond = batch_conditions(task.generator, batch)
    stops = []
    generate = task.objective.generate
    monkeypatch.setattr(task.objective, "generate", lambda *a: stops.append(a[-1]) or generate(*a))
    images = task._sample(batch, SampleRandomness(0, 5, batch["index"]), cond, with_grad=False)
    assert set(torch.cat(stops).tolist()) == set(range(matching))  # 16 draws: both steps of m=2 occur
    if matching == 1:
        noise = SampleRandomness(0, 5, batch["index"]).randn(batch["latent"].shape[1:], "cpu")
        with torch.no_grad():
            one_step = task.objective.x0(task.generator, noise, torch.full((16,), 999), cond)
        torch.testing.assert_close(images, one_step, rtol=0, atol=0)


def run_cli(tmp_path, *args):
    runs = tmp_path / "runs"
    code = dmd_main(["--config", "dmd_shapes", "--set", f"train.runs_dir={runs}", *args])
    return code, (list(runs.iterdir()) if runs.exists() else [])


@pytest.mark.parametrize("override, message", [
    ("dmd.fake_updates=0", "dmd.fake_updates must be >= 1"),
    ("dmd.fake_updates=-3", "dmd.fake_updates must be >= 1"),
    ("dmd.generator_steps=51", "dmd.generator_steps must be in 1..50"),
    ("dmd.matching_steps=2", "dmd.matching_steps must be in 1..dmd.generator_steps=1"),
    ("dmd.matching_steps=0", "dmd.matching_steps must be in 1..dmd.generator_steps=1"),
    ("dmd.t_min=0.99", "dmd.t_min and dmd.t_max"),
    ("dmd.gan_t_max=0.01", "dmd.gan_t_max must be in (dmd.t_min=0.02, 1]"),
    ("dmd.gan_pool=max", "dmd.gan_pool must be 'mean' (one logit per image) or 'tokens'"),
    ("dmd.real_guidance=nan", "dmd.real_guidance must be a finite number"),
    ("dmd.regression_edge_weight=-1", "dmd.regression_edge_weight must be a finite number >= 0"),
    ("dmd.regression_feature_weight=-1", "dmd.regression_feature_weight must be a finite number >= 0"),
    ("dmd.regression_feature_t=0", "dmd.regression_feature_t must be in (0, 1]"),
    ("dmd.generator_timesteps=[999, 259]", "dmd.generator_timesteps: LCM timesteps [999, 259] give 2 steps but "
                                           "steps is 1"),
    ("dmd.generator_timesteps=[259]", "dmd.generator_timesteps: LCM timesteps [259] must be strictly descending "
                                      "from 999"),
])
def test_bad_dmd_settings_exit_2_before_anything_loads(tmp_path, caplog, override, message):
    code, runs = run_cli(tmp_path, "--set", override)
    assert code == 2 and runs == [] and message in caplog.text


def test_a_sample_section_that_does_not_draw_the_generators_timesteps_is_refused(tmp_path, caplog):
    two = ["--set", "dmd.generator_steps=2", "--set", "sample.steps=2", "--set", "dmd.regression_weight=0",
           "--set", "dmd.pairs=null"]
    code, runs = run_cli(tmp_path, *two, "--set", "dmd.generator_timesteps=[999, 259]", "--set",
                         "sample.sampler_options.timesteps=[999, 499]")
    assert code == 2 and runs == []
    assert "trains at timesteps [999, 259] (dmd.generator_timesteps) but the sample section draws its 2 steps at " \
           "[999, 499]: set sample.sampler_options to {timesteps: [999, 259]}" in caplog.text
    caplog.clear()
    code, runs = run_cli(tmp_path, *two, "--set", "sample.sampler_options={timesteps: [999, 259]}")
    assert code == 2 and runs == [] and "trains at timesteps [999, 499]" in caplog.text and "drop its" in caplog.text


def test_a_generator_at_given_timesteps_exports_them_and_sampling_it_elsewhere_is_flagged(teacher_file, tmp_path,
                                                                                          caplog):
    from configs import Config, load_config
    from pipeline.generate import plan

    given = ["dmd.generator_steps=2", "dmd.generator_timesteps=[999, 259]", "sample.sampler=lcm", "sample.steps=2",
             "train.steps=1"]  # the sample section's timesteps follow (configs/schema.py: Config.config_defaults)
    run = train(dmd_config(tmp_path, teacher_file, *given), DMDTask, toy_data)
    assert peek(run / "ema.safetensors").metadata["generator_timesteps"] == "999,259"
    shapes = tmp_path / "shapes-student.safetensors"  # the shapes teacher's weights with such an export's metadata
    net, net_cfg, _ = load_checkpoint("weights/shapes/teacher.safetensors")
    save_checkpoint(net.state_dict(), net_cfg, shapes, "safetensors",
                    metadata={"generator_timesteps": "999,759,499,119"})
    prompt = ["a large red circle at the center"]
    plan(load_config(Config, "lcm_shapes", [f"sample.checkpoint={shapes}", "sample.steps=4"]), prompt)
    assert "trained as a 4-step generator at timesteps 999,759,499,119 but is sampled at 999,759,499,259" \
        in caplog.text
    caplog.clear()
    plan(load_config(Config, "lcm_shapes", [f"sample.checkpoint={shapes}", "sample.steps=4",
                                            "sample.sampler_options={timesteps: [999, 759, 499, 119]}"]), prompt)
    plan(load_config(Config, "lcm_shapes", [f"sample.checkpoint={shapes}", "sample.steps=2"]), prompt)
    assert "trained as a" not in caplog.text  # its own timesteps, or another step count: nothing to flag


def test_an_edge_weight_without_the_regression_term_is_refused(tmp_path, caplog):
    code, runs = run_cli(tmp_path, "--set", "dmd.regression_weight=0", "--set", "dmd.pairs=null", "--set",
                         "dmd.distribution_weight=1", "--set", "dmd.regression_edge_weight=1")
    assert code == 2 and runs == [] and "dmd.regression_edge_weight=1.0 weights an edge term" in caplog.text
    caplog.clear()
    code, runs = run_cli(tmp_path, "--set", "dmd.regression_weight=0", "--set", "dmd.pairs=null", "--set",
                         "dmd.distribution_weight=1", "--set", "dmd.regression_feature_weight=1")
    assert code == 2 and runs == [] and "dmd.regression_feature_weight=1.0 adds a teacher-feature" in caplog.text


def test_a_teacher_without_null_caption_is_refused_for_guidance(tmp_path, caplog):
    net, cfg = toy_net(5)
    folder = tmp_path / "plain-diffusers"
    save_checkpoint(net.state_dict(), cfg, folder, "diffusers")
    (folder / "transformer" / "null_caption.safetensors").unlink()  # as diffusers writes it: no y_embedding
    code, runs = run_cli(tmp_path, "--set", f"dmd.teacher={folder}")
    assert code == 2 and runs == [] and "has none (a plain diffusers folder)" in caplog.text


def test_resuming_an_lcd_run_with_the_dmd_trainer_is_refused(teacher_file, tmp_path, caplog):
    from tasks.lcd import LCMTask

    lcd = train(toy_config(tmp_path / "lcd", f"distill.teacher={teacher_file}", "train.steps=1",
                           "train.checkpoint_every=1", "train.ema_decay=0"), LCMTask, toy_data)
    before = sorted((tmp_path / "lcd").iterdir())
    code = dmd_main(["--resume", str(lcd)])
    assert code == 2 and "trains ['fake_score', 'generator']" in caplog.text and "train_lcm.py" in caplog.text
    assert sorted((tmp_path / "lcd").iterdir()) == before


# ----------------------------------------------------------------------------------------------------------
# DMD's regression term on the teacher's noise-image pairs (tools/make_ode_pairs.py, dmd.pairs)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    """A feature cache of six toy captions in the format tools/extract_features.py writes."""
    from data.features import sample_file, write_index, write_sample

    cache = tmp_path_factory.mktemp("toy-cache")
    gen = torch.Generator().manual_seed(7)
    entries = []
    for i in range(6):
        key = f"toy-{i}"
        mask = torch.zeros(8, dtype=torch.int8)
        mask[: 3 + i % 4] = 1
        write_sample(cache / sample_file(key), {"latent": torch.randn(4, 8, 8, generator=gen),
                                                "y": torch.randn(8, 32, generator=gen), "mask": mask},
                     {"key": key, "caption": f"caption {i}"})
        entries.append({"key": key, "bucket": "1.0", "height": 8, "width": 8, "caption": f"caption {i}",
                        "file": sample_file(key)})
    write_index(cache, entries)
    return cache


def make_pairs(tmp_path, teacher, cache, *overrides, num=5, args=(), name="pairs"):
    """tools/make_ode_pairs.py with the toy model's config: the teacher's one-step DDIM (t = 999), unguided."""
    out = tmp_path / f"{name}.safetensors"
    sets = [f"data.cache_dir={cache}", f"sample.checkpoint={teacher}", "sample.sampler=ddim", "sample.steps=1",
            "sample.guidance=1", "sample.sampler_options={spacing: trailing}", *overrides]
    path = save_config(toy_config(tmp_path / "unused-runs"), tmp_path / "toy.yaml")
    code = make_pairs_main([str(out), "--config", str(path), "--num", str(num), "--batch-size", "2",
                            "--no-progress", *args, *[a for s in sets for a in ("--set", s)]])
    return code, out


def test_the_teacher_has_zero_regression_loss_on_its_own_one_step_pairs(teacher_file, toy_cache, tmp_path):
    """Pairs from the teacher's one-step DDIM (trailing: t = 999, unguided) are exactly its x0 estimate from the
    stored noise under the stored caption; the generator's first step is that same estimate when the generator is
    the teacher, so its regression loss is 0, and another network's is not. This ties the tool's noise, captions and
    images to what the regression term feeds the generator."""
    code, out = make_pairs(tmp_path, teacher_file, toy_cache)
    assert code == 0
    pairs = load_pairs(out)
    assert len(pairs["image"]) == 5 and len(set(pairs["index"].tolist())) == 5
    teacher, _, _ = load_checkpoint(teacher_file)
    other, _ = toy_net(6)
    objective = DistributionMatching(SCHEDULE, generator_steps=2)
    cond = {"y": pairs["y"], "mask": pairs["mask"].long()}
    with torch.no_grad():
        own = objective.regression_loss(teacher, pairs["noise"], pairs["image"], cond)
        foreign = objective.regression_loss(other, pairs["noise"], pairs["image"], cond)
    assert own.max() < 1e-8 and foreign.min() > 1e-4  # float round-off against a real difference


def test_regression_of_a_later_step_is_against_the_lcm_samplers_image_from_the_pair_noise():
    """With a step drawn per pair, the regressed image of a pair stopped at the last step is what LCM's multistep
    sampler draws from the pair's noise (same re-noising), and one stopped at step 0 is the first step's output, the
    one-step term."""
    net, cfg = toy_net(4)
    noise, cond = conditions(cfg, n=2)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))
    for steps in (2, 4):
        objective = DistributionMatching(SCHEDULE, generator_steps=steps)
        gen = torch.Generator().manual_seed(11)
        fresh = [torch.randn(noise.shape, generator=gen) for _ in range(steps - 1)]
        with torch.no_grad():
            last = objective.regression_loss(net, noise, target, cond, fresh, torch.full((2,), steps - 1))
            first = objective.regression_loss(net, noise, target, cond, fresh, torch.zeros(2, dtype=torch.long))
            eps = lambda x, t: net(x, t, **cond)[:, :4]  # noqa: E731
            lcm = sample_lcm(eps, noise, SCHEDULE, steps, generator=torch.Generator().manual_seed(11))
            one_step = sample_lcm(eps, noise, SCHEDULE, 1)
        torch.testing.assert_close(last, (lcm - target).square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first, (one_step - target).square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first, objective.regression_loss(net, noise, target, cond))


DPM_ONE_STEP = ("sample.sampler=dpm", "sample.sampler_options={}")  # 1 step from any start: the x0 estimate there
STARTS = ("--start-timesteps", "759,499,259")  # the 4-step generator's later timesteps


def test_re_noised_pairs_hold_the_teachers_image_from_what_each_later_step_sees(teacher_file, toy_cache, tmp_path):
    """--start-timesteps rows: the row's image is the teacher's solve from the row's latent at the row's timestep.
    With a one-step unguided DPM-Solver that solve is the teacher's x0 estimate there, so the teacher as a 4-step
    generator has zero loss on every row at its own step (regression_loss_at) and another network does not; the
    rows from noise are the plain file's, and each re-noised latent is the row-from-noise image noised to its
    timestep (its implied noise is the one standardised draw, not the image)."""
    code, plain = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="plain")
    assert code == 0
    code, out = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, args=STARTS)
    assert code == 0
    pairs, first = load_pairs(out), load_pairs(plain)
    assert sorted(pairs["timestep"].tolist()) == sorted([999, 759, 499, 259] * 5)
    from_noise = pairs["timestep"] == 999
    for key in first:
        torch.testing.assert_close(pairs[key][from_noise], first[key], rtol=0, atol=0)
    teacher, _, _ = load_checkpoint(teacher_file)
    other, _ = toy_net(6)
    objective = DistributionMatching(SCHEDULE, generator_steps=4)
    cond = {"y": pairs["y"], "mask": pairs["mask"].long()}
    with torch.no_grad():
        own = objective.regression_loss_at(teacher, pairs["noise"], pairs["timestep"], pairs["image"], cond)
        foreign = objective.regression_loss_at(other, pairs["noise"], pairs["timestep"], pairs["image"], cond)
    assert own.max() < 1e-8 and foreign.min() > 1e-4
    image_of = {i: img for i, img in zip(first["index"].tolist(), first["image"])}
    for row in torch.nonzero(~from_noise).flatten().tolist():
        t = pairs["timestep"][row:row + 1]
        alpha, sigma = SCHEDULE.alpha_sigma(t, pairs["noise"][row:row + 1])
        implied = (pairs["noise"][row] - alpha[0] * image_of[pairs["index"][row].item()]) / sigma[0]
        assert 0.5 < implied.std() < 1.5 and abs(implied.mean()) < 0.5


def test_on_policy_rows_start_from_the_students_own_state_at_each_later_step(teacher_file, toy_cache, tmp_path):
    """--student: each later row starts where the student's own sampling is at that timestep. With the teacher as
    the student and a one-step unguided solve (the teacher's x0 estimate), the first later row is the teacher's
    image re-noised with the same fresh noise as the off-policy row (they coincide exactly), and each row after it is
    the previous row's image (the student's output at that step) re-noised with the off-policy row's implied noise;
    the rows from noise are unchanged and the file names its student."""
    starts = ("--start-timesteps", "759,499")
    code, plain = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="plain", args=starts)
    assert code == 0
    code, on = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="on",
                          args=(*starts, "--student", str(teacher_file)))
    assert code == 0
    off, ours = load_pairs(plain), load_pairs(on)
    assert read_pairs_metadata(on)["student"] == str(teacher_file)
    rows = {t: (off["timestep"] == t, ours["timestep"] == t) for t in (999, 759, 499)}
    for key in ("noise", "image", "index"):
        torch.testing.assert_close(ours[key][rows[999][1]], off[key][rows[999][0]], rtol=0, atol=0)
    torch.testing.assert_close(ours["noise"][rows[759][1]], off["noise"][rows[759][0]], rtol=0, atol=1e-5)
    t = torch.full((int(rows[499][0].sum()),), 499)
    alpha, sigma = SCHEDULE.alpha_sigma(t, off["noise"][rows[499][0]])
    implied = (off["noise"][rows[499][0]] - alpha * off["image"][rows[999][0]]) / sigma  # the fresh noise at 499
    expected = alpha * ours["image"][rows[759][1]] + sigma * implied
    torch.testing.assert_close(ours["noise"][rows[499][1]], expected, rtol=1e-5, atol=1e-5)  # float round-off
    assert not torch.allclose(ours["noise"][rows[499][1]], off["noise"][rows[499][0]], atol=1e-3)


def test_a_student_without_later_timesteps_is_refused(teacher_file, toy_cache, tmp_path, caplog):
    code, out = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, args=("--student", str(teacher_file)))
    assert code == 2 and "--student makes rows from the student's states" in caplog.text and not out.exists()


def test_extending_a_pairs_file_gives_the_file_made_from_scratch(teacher_file, toy_cache, tmp_path, caplog):
    """--extend keeps an existing file's rows from noise (they are not sampled again) and adds the re-noised ones:
    the same file as one run with --start-timesteps; a file of another sampler config is refused by name."""
    code, plain = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="plain")
    code, whole = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, args=STARTS, name="whole")
    code, extended = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="extended",
                                args=(*STARTS, "--extend", str(plain)))
    assert code == 0
    a, b = load_file(whole), load_file(extended)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    code, out = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, "sample.guidance=2", name="other",
                           args=(*STARTS, "--extend", str(plain)))
    assert code == 2 and "guidance: '1.0' there, '2.0' here" in caplog.text and not out.exists()


@pytest.mark.parametrize("args, overrides, message", [
    (("--start-timesteps", "759,999"), DPM_ONE_STEP, "--start-timesteps must be distinct timesteps in 1..998"),
    (("--start-timesteps", "759,x"), DPM_ONE_STEP, "must be comma-separated integers"),
    (STARTS, (), "--start-timesteps needs sample.sampler=dpm"),
    (("--extend", "pairs.safetensors"), DPM_ONE_STEP, "give --start-timesteps too"),
])
def test_bad_start_timesteps_exit_2_and_write_nothing(teacher_file, toy_cache, tmp_path, caplog, args, overrides,
                                                      message):
    code, out = make_pairs(tmp_path, teacher_file, toy_cache, *overrides, args=args)
    assert code == 2 and message in caplog.text
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


@pytest.mark.parametrize("mode, steps, timesteps, message", [
    ("own", 4, None, "holds rows from pure noise only"),
    ("own", 2, [259, 759, 999], "the 2-step generator ([999, 499]) has later steps at [499] that no row starts at"),
    ("own", 4, [499, 759, 999], "the 4-step generator ([999, 759, 499, 259]) has later steps at [259] that no row"),
    ("all", 4, [259, 999], "set dmd.regression_steps=own"),
    ("own", 1, [259, 499, 759, 999], "dmd.generator_steps is 1: use dmd.regression_steps=first"),
])
def test_pairs_that_do_not_fit_the_regression_mode_are_refused(mode, steps, timesteps, message):
    from diffusion.config import DMDConfig
    from tasks.dmd import check_pair_timesteps

    dc = DMDConfig(teacher="t.safetensors", generator_steps=steps, regression_steps=mode, regression_weight=1.0,
                   pairs="p.safetensors")
    with pytest.raises(UserError, match=re.escape(message)):
        check_pair_timesteps(dc, timesteps, 1000)
    if steps > 1:  # fitting rows pass (a one-step generator has no later steps to fit)
        check_pair_timesteps(dc, None if mode != "own" else [259, 499, 759, 999], 1000)


def test_an_interrupted_pairs_run_resumes_to_the_same_file(teacher_file, toy_cache, tmp_path, monkeypatch):
    """Ctrl-C in the second batch exits 130 and keeps the first batch in OUT.parts/; the same command then goes on
    from there (the first batch is not sampled again) to the file an uninterrupted run writes."""
    import pipeline.generate

    code, whole = make_pairs(tmp_path / "a", teacher_file, toy_cache)
    assert code == 0
    real, calls = pipeline.generate.denoise_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.generate, "denoise_batch", interrupted)
    code, out = make_pairs(tmp_path / "b", teacher_file, toy_cache)
    parts = out.with_name(out.name + ".parts")
    assert code == 130 and not out.exists() and len(list(parts.iterdir())) == 1
    code, resumed = make_pairs(tmp_path / "b", teacher_file, toy_cache)
    assert code == 0 and len(calls) == 4 and not parts.exists()  # batches 2 and 3 only: the first was kept
    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_dmd_with_the_regression_term_trains_and_resumes_exactly(teacher_file, toy_cache, tmp_path):
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    extra = [f"dmd.pairs={pairs}", "dmd.regression_weight=0.5"]
    straight = train(dmd_config(tmp_path / "a", teacher_file, *extra), DMDTask, toy_data)
    first = train(dmd_config(tmp_path / "b", teacher_file, "train.steps=3", *extra), DMDTask, toy_data)
    resumed = train(dmd_config(tmp_path / "b", teacher_file, *extra), DMDTask, toy_data, resume=str(first))
    a, b = last_state(straight, "generator"), last_state(resumed, "generator")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    plain = last_state(train(dmd_config(tmp_path / "c", teacher_file), DMDTask, toy_data), "generator")
    assert any(not torch.equal(a["model"][k], plain["model"][k]) for k in a["model"])  # the term changes training


def test_a_two_step_generator_regresses_every_step_the_first_or_its_own_and_resumes_exactly(teacher_file, toy_cache,
                                                                                    tmp_path):
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    extra = [f"dmd.pairs={pairs}", "dmd.regression_weight=0.5", "dmd.generator_steps=2"]
    runs = {}
    code, renoised = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, name="renoised",
                                args=STARTS)  # the 2-step generator keeps the 999 and 499 rows
    for mode in ("all", "first", "own"):
        sets = [*extra, f"dmd.regression_steps={mode}", *([f"dmd.pairs={renoised}"] if mode == "own" else [])]
        straight = train(dmd_config(tmp_path / mode / "a", teacher_file, *sets), DMDTask, toy_data)
        first = train(dmd_config(tmp_path / mode / "b", teacher_file, "train.steps=3", *sets), DMDTask, toy_data)
        resumed = train(dmd_config(tmp_path / mode / "b", teacher_file, *sets), DMDTask, toy_data, resume=str(first))
        a, b = last_state(straight, "generator"), last_state(resumed, "generator")
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
        runs[mode] = a["model"]
    assert any(not torch.equal(runs["all"][k], runs["first"][k]) for k in runs["all"])  # the later step is trained
    assert any(not torch.equal(runs["own"][k], runs["all"][k]) for k in runs["all"])
    own = DMDTask(dmd_config(tmp_path / "own" / "c", teacher_file, *extra, "dmd.regression_steps=own",
                             f"dmd.pairs={renoised}"), torch.device("cpu"))
    assert sorted(set(own.pairs["timestep"].tolist())) == [499, 999] and len(own.pairs["index"]) == 10


@pytest.mark.parametrize("mode", ["own", "all"])
def test_regression_step_weights_scale_each_rows_loss_by_its_steps_weight(teacher_file, toy_cache, tmp_path, mode):
    """The same draws with weights [3, 3] give exactly 3x the unweighted rows; with [1, 0] the rows of the second step
    give 0 and the first step's rows their unweighted loss."""
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache, num=6)
    if mode == "own":
        code, pairs = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, num=6, name="renoised",
                                 args=STARTS)
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(4)])
    losses, steps = {}, None
    for weights in (None, [3, 3], [1, 0]):
        sets = [f"dmd.pairs={pairs}", "dmd.regression_weight=1", "dmd.distribution_weight=0",
                "dmd.generator_steps=2", f"dmd.regression_steps={mode}",
                *([f"dmd.regression_step_weights={weights}"] if weights else [])]
        task = DMDTask(dmd_config(tmp_path / "runs", teacher_file, *sets), torch.device("cpu"))
        with torch.no_grad():
            losses[str(weights)] = task._regression(batch, SampleRandomness(7, 0, batch["index"]))
        if steps is None:  # each row's step, from the same draws the term makes
            rng = SampleRandomness(7, 0, batch["index"])
            pick = rng.randint(len(task.pairs["image"]), "cpu")
            if mode == "own":
                steps = (task.pairs["timestep"][pick] != 999).long()
            else:
                rng.randn(task.pairs["noise"].shape[1:], "cpu")  # the draw that re-noises the first step's image
                steps = rng.randint(2, "cpu")
    plain = losses["None"]
    assert (plain > 0).all() and set(steps.tolist()) == {0, 1}
    torch.testing.assert_close(losses["[3, 3]"], 3 * plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["[1, 0]"], torch.where(steps == 0, plain, 0.0), rtol=1e-6, atol=0)


def test_the_regression_term_alone_trains_the_generator_only_and_resumes_exactly(teacher_file, toy_cache, tmp_path,
                                                                                   caplog):
    """distribution_weight=0 (no GAN): no fake score is built or checkpointed, the generator's update is the
    regression term, a resume is exact, and resuming such a run with the DMD term switched on is refused."""
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    extra = [f"dmd.pairs={pairs}", "dmd.regression_weight=0.5", "dmd.distribution_weight=0"]
    straight = train(dmd_config(tmp_path / "a", teacher_file, *extra), DMDTask, toy_data)
    first = train(dmd_config(tmp_path / "b", teacher_file, "train.steps=3", *extra), DMDTask, toy_data)
    resumed = train(dmd_config(tmp_path / "b", teacher_file, *extra), DMDTask, toy_data, resume=str(first))
    state = torch.load(next((straight / "checkpoints").iterdir()), weights_only=True)
    assert list(state["networks"]) == ["generator"]
    a, b = last_state(straight, "generator"), last_state(resumed, "generator")
    assert a["optimizer"]["state"][0]["step"] == a["step"]  # one update per step, nothing else in the step
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    teacher, _, _ = load_checkpoint(teacher_file)
    assert any(not torch.equal(a["model"][k].float(), v.float()) for k, v in teacher.state_dict().items())
    task = DMDTask(dmd_config(tmp_path / "c", teacher_file, *extra), torch.device("cpu"))
    assert task.fake is None and list(task.networks()) == ["generator"]
    before = sorted(p.relative_to(straight) for p in straight.rglob("*"))
    code = dmd_main(["--resume", str(straight), "--set", "dmd.distribution_weight=0.25"])
    assert code == 2 and "trained the networks ['generator']" in caplog.text
    assert "trains ['fake_score', 'generator']" in caplog.text and "dmd.distribution_weight" in caplog.text
    assert sorted(p.relative_to(straight) for p in straight.rglob("*")) == before


def test_the_teacher_feature_term_changes_the_regression_update_and_resumes_exactly(teacher_file, toy_cache,
                                                                                    tmp_path):
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    extra = [f"dmd.pairs={pairs}", "dmd.regression_weight=0.5", "dmd.distribution_weight=0"]
    feature = [*extra, "dmd.regression_feature_weight=2", "dmd.regression_feature_t=0.5"]
    plain = train(dmd_config(tmp_path / "p", teacher_file, *extra), DMDTask, toy_data)
    straight = train(dmd_config(tmp_path / "a", teacher_file, *feature), DMDTask, toy_data)
    first = train(dmd_config(tmp_path / "b", teacher_file, "train.steps=3", *feature), DMDTask, toy_data)
    resumed = train(dmd_config(tmp_path / "b", teacher_file, *feature), DMDTask, toy_data, resume=str(first))
    a, b, p = (last_state(r, "generator")["model"] for r in (straight, resumed, plain))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], p[k]) for k in a)


def test_a_deepened_generator_starts_as_the_teacher_trains_exports_and_resumes(teacher_file, toy_cache, tmp_path,
                                                                               caplog):
    """dmd.generator_depth: the generator has more blocks than the teacher (identity at the start: its output is the
    teacher's exactly), the fake score keeps the teacher's; the run resumes exactly, its export and the curve's
    export of a training checkpoint declare the deeper model and load as it; fewer blocks are refused."""
    from engine.state import read_training_state

    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    extra = [f"dmd.pairs={pairs}", "dmd.regression_weight=0.5", "dmd.distribution_weight=0.5", "dmd.generator_depth=3"]
    task = DMDTask(dmd_config(tmp_path / "c", teacher_file, *extra), torch.device("cpu"))
    assert len(task.generator.blocks) == 3 and len(task.fake.net.blocks) == 2
    teacher, cfg = toy_net(4)
    x, t, y, mask, _ = random_inputs(cfg, height=8, width=8)
    with torch.no_grad():
        torch.testing.assert_close(task.generator(x, t, y, mask), teacher(x, t, y, mask), rtol=0, atol=0)
    straight = train(dmd_config(tmp_path / "a", teacher_file, *extra), DMDTask, toy_data)
    first = train(dmd_config(tmp_path / "b", teacher_file, "train.steps=3", *extra), DMDTask, toy_data)
    resumed = train(dmd_config(tmp_path / "b", teacher_file, *extra), DMDTask, toy_data, resume=str(first))
    a, b = last_state(straight, "generator")["model"], last_state(resumed, "generator")["model"]
    assert "blocks.2.attn.proj.weight" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    exported, cfg3, _ = load_checkpoint(straight / "ema.safetensors")
    assert cfg3.depth == 3 and len(exported.blocks) == 3
    state = read_training_state(next((straight / "checkpoints").iterdir()))
    assert state.config.depth == 3
    code, runs = run_cli(tmp_path / "refused", "--set", "dmd.generator_depth=1")
    assert code == 2 and runs == [] and "dmd.generator_depth=1 is less than the teacher's" in caplog.text
    # the deeper export as the start of another run: with its depth it is the generator, without it refused
    on = DMDTask(dmd_config(tmp_path / "d", teacher_file, *extra, f"dmd.generator_init={straight / 'ema.safetensors'}"),
                 torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(on.generator(x, t, y, mask), exported.float()(x, t, y, mask), rtol=0, atol=0)
    caplog.clear()
    code, runs = run_cli(tmp_path / "refused2", "--set", f"dmd.teacher={teacher_file}", "--set",
                         f"dmd.generator_init={straight / 'ema.safetensors'}")
    assert code == 2 and runs == [] and "set dmd.generator_depth=3 to train it on" in caplog.text


def test_pairs_loss_is_zero_for_the_teacher_on_its_own_one_step_pairs(teacher_file, toy_cache, tmp_path, capsys,
                                                                         caplog):
    """tools/pairs_loss.py feeds each row at its start timestep as the regression term does: the teacher's one-step
    pairs are its own x0 estimates, so its loss is 0 to round-off and another network's is not; bad input exits 2."""
    from tools.pairs_loss import main as pairs_loss_main

    _, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    other, cfg = toy_net(6)
    other_file = tmp_path / "other.safetensors"
    save_checkpoint(other.state_dict(), cfg, other_file, "safetensors")
    config = save_config(toy_config(tmp_path / "unused-runs"), tmp_path / "toy.yaml")
    out = tmp_path / "loss.md"
    assert pairs_loss_main([str(pairs), str(teacher_file), str(other_file), "--config", str(config), "--out",
                            str(out)]) == 0
    rows = {line.split(" | ")[0].strip("| "): float(line.split(" | ")[1].strip(" |"))
            for line in out.read_text().splitlines() if line.startswith("| /")}
    assert rows[str(teacher_file)] < 1e-8 and rows[str(other_file)] > 1e-4
    assert out.read_text() in capsys.readouterr().out
    for args, message in [(["--rows", "0"], "--rows must be >= 1"),
                          ([str(tmp_path / "no.safetensors")], "no such checkpoint")]:
        caplog.clear()
        assert pairs_loss_main([str(pairs), str(teacher_file), *args, "--config", str(config)]) == 2
        assert message in caplog.text


def test_pairs_loss_kind_agreement_reads_the_largest_shape_of_each_image():
    """--kinds: the reader's kind of each image's largest shape (renders of the data set's own shapes, in [-1, 1]),
    None for a blank image, and the agreement over the rows where the teacher's image holds a shape."""
    from data.synthetic import parse_caption, render
    from tools.pairs_loss import kind_agreement, largest_kind

    captions = ["a large red square at the center", "a large blue circle at the top left",
                "a medium green triangle at the center"]
    images = [np.asarray(render(parse_caption(c), 32, 32)) for c in captions] + [np.full((32, 32, 3), 255, np.uint8)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert largest_kind(batch) == ["square", "circle", "triangle", None]
    assert kind_agreement(["square", "circle", None, "cross"], ["square", "square", "triangle", None]) == 100 / 3


def test_joined_pairs_files_are_their_rows_in_order_and_train(teacher_file, toy_cache, tmp_path):
    from tools.join_pairs import main as join_main

    _, a = make_pairs(tmp_path, teacher_file, toy_cache, num=5, name="a")
    _, b = make_pairs(tmp_path, teacher_file, toy_cache, num=3, name="b", args=("--seed", "5"))
    out = tmp_path / "joined.safetensors"
    assert join_main([str(out), str(a), str(b)]) == 0
    joined, ta, tb = load_pairs(out), load_pairs(a), load_pairs(b)
    assert joined.keys() == ta.keys() and all(torch.equal(joined[k], torch.cat([ta[k], tb[k]])) for k in joined)
    meta = read_pairs_metadata(out)
    assert meta["seed"] == "0,5" and meta["num"] == "8" and meta["teacher_sha256"] == read_pairs_metadata(a)[
        "teacher_sha256"]
    task = DMDTask(dmd_config(tmp_path / "runs", teacher_file, f"dmd.pairs={out}", "dmd.regression_weight=1",
                              "dmd.distribution_weight=0"), torch.device("cpu"))
    assert len(task.pairs["index"]) == 8


def test_pairs_that_cannot_be_joined_exit_2_and_write_nothing(teacher_file, toy_cache, tmp_path, caplog):
    from tools.join_pairs import main as join_main

    _, a = make_pairs(tmp_path, teacher_file, toy_cache, num=5, name="a")
    _, overlapping = make_pairs(tmp_path, teacher_file, toy_cache, num=3, name="o", args=("--seed", "3"))
    _, guided = make_pairs(tmp_path, teacher_file, toy_cache, "sample.guidance=2", num=3, name="g",
                           args=("--seed", "5"))
    starts = ("--start-timesteps", "759")
    _, off = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, num=3, name="off", args=starts)
    _, on = make_pairs(tmp_path, teacher_file, toy_cache, *DPM_ONE_STEP, num=3, name="on",
                       args=(*starts, "--seed", "3", "--student", str(teacher_file)))
    out = tmp_path / "joined.safetensors"
    for files, message in [((a, overlapping), "share noise seeds"), ((a, guided), "made with other settings"),
                           ((off, on), "student: None in"),
                           ((a,), "at least two"), ((a, tmp_path / "missing.safetensors"), "cannot read")]:
        caplog.clear()
        assert join_main([str(out), *map(str, files)]) == 2 and message in caplog.text
        assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("dmd.pairs=null", "needs the teacher's noise-image pairs"),
    ("dmd.regression_weight=0", "dmd.regression_weight is 0"),
    ("dmd.distribution_weight=0 dmd.regression_weight=0 dmd.pairs=null", "nothing trains the generator"),
    ("dmd.distribution_weight=-1", "dmd.distribution_weight must be a finite number"),
    ("dmd.regression_steps=last", "dmd.regression_steps must be 'all'"),
    ("dmd.regression_step_weights=[1,2]", "dmd.regression_step_weights has 2 weights for a 1-step generator"),
    ("dmd.generator_steps=2 dmd.regression_step_weights=[1,-2]", "dmd.regression_step_weights must be finite"),
    ("dmd.generator_steps=2 dmd.regression_step_weights=[0,0]", "dmd.regression_step_weights must be finite"),
    ("dmd.generator_steps=2 dmd.regression_steps=first dmd.regression_step_weights=[1,2]",
     "dmd.regression_steps=first trains the first step only"),
    ("dmd.regression_steps=own dmd.generator_steps=4 dmd.pairs=no/such/pairs4.safetensors",
     "--extend PAIRS --start-timesteps 759,499,259"),
    ("dmd.generator_init=no/such/generator.safetensors", "dmd.generator_init=no/such/generator.safetensors does not "
                                                         "exist"),
])
def test_bad_regression_settings_exit_2_before_anything_loads(tmp_path, caplog, override, message):
    code, runs = run_cli(tmp_path, *[a for o in override.split() for a in ("--set", o)])
    assert code == 2 and runs == [] and message in caplog.text


def test_pairs_of_another_teacher_are_refused(teacher_file, toy_cache, tmp_path, caplog):
    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    net, cfg = toy_net(8)
    other = tmp_path / "other-teacher.safetensors"
    save_checkpoint(net.state_dict(), cfg, other, "safetensors")
    code, runs = run_cli(tmp_path, "--set", f"dmd.teacher={other}", "--set", f"dmd.pairs={pairs}",
                         "--set", "dmd.regression_weight=0.25", "--set", "dmd.generator_init=null")
    assert code == 2 and runs == [] and "was sampled from" in caplog.text


def test_pairs_of_other_channels_are_refused_before_anything_loads(teacher_file, toy_cache, tmp_path, caplog):
    """Pairs whose captions are wider than the model's (e.g. made under another text encoder's config) stop the run
    at the config check: exit 2, no run folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    code, pairs = make_pairs(tmp_path, teacher_file, toy_cache)
    with safe_open(str(pairs), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(pairs)
    tensors["y"] = torch.cat([tensors["y"], tensors["y"]], dim=-1)  # 32 -> 64 caption channels
    wide = tmp_path / "wide.safetensors"
    save_file(tensors, str(wide), metadata=meta)
    code, runs = run_cli(tmp_path, "--set", f"dmd.teacher={teacher_file}", "--set", f"dmd.pairs={wide}",
                         "--set", "dmd.regression_weight=0.25", "--set", "dmd.generator_init=null")
    assert code == 2 and runs == [] and "'caption channels': 64" in caplog.text


def test_a_file_that_is_not_pairs_is_refused(teacher_file, tmp_path, caplog):
    code, runs = run_cli(tmp_path, "--set", f"dmd.teacher={teacher_file}", "--set", f"dmd.pairs={teacher_file}",
                         "--set", "dmd.regression_weight=0.25", "--set", "dmd.generator_init=null")
    assert code == 2 and runs == [] and "is not a noise-image pairs file" in caplog.text


@pytest.mark.parametrize("overrides, num, message", [
    (["sample.sampler=lcm"], 5, "draws fresh noise at every step"),
    ([], 7, "--num 7 is more than the 6 captions"),
])
def test_bad_pairs_requests_exit_2_and_write_nothing(teacher_file, toy_cache, tmp_path, caplog, overrides, num,
                                                     message):
    code, out = make_pairs(tmp_path, teacher_file, toy_cache, *overrides, num=num)
    assert code == 2 and message in caplog.text
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()

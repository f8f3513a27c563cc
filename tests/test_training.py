"""The shared training loop with the PixArt-alpha task: learning, exact resume, DDP, logs, failures, signals."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy_training import ToyLatents, last_state, toy_config, toy_data

from engine.loop import TrainingError, train
from engine.randomness import SampleRandomness
from engine.state import ResumeError, latest_checkpoint, new_run_dir
from models.checkpoint import load_checkpoint
from tasks.alpha import PixArtAlphaTask

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
Task = PixArtAlphaTask


def final_weights(run: Path) -> dict:
    return last_state(run)["model"]


def assert_same_weights(a: dict, b: dict, atol: float):
    assert sorted(a) == sorted(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"


def fixed_batch_loss(task, cfg) -> float:
    data = ToyLatents()
    batch = data.collate([data[i] for i in range(8)])
    with torch.no_grad():
        return task.loss(task.model.eval(), batch, SampleRandomness(123, 0, batch["index"]))[0].item()


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    cfg = toy_config(tmp_path, "train.steps=30", "train.checkpoint_every=30", "train.warmup_steps=1",
                     "train.class_dropout_prob=0.0")
    task = Task(cfg, torch.device("cpu"))
    before = fixed_batch_loss(task, cfg)
    run = train(cfg, Task, toy_data)
    task.model.load_state_dict(final_weights(run))
    after = fixed_batch_loss(task, cfg)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, accumulation):
    common = (f"train.grad_accumulation={accumulation}", "train.steps=6")
    straight = train(toy_config(tmp_path / "a", *common), Task, toy_data)
    first = train(toy_config(tmp_path / "b", *common, "train.steps=3"), Task, toy_data)
    resumed = train(toy_config(tmp_path / "b", *common), Task, toy_data, resume=str(first))
    assert resumed == first
    a, b = (last_state(r) for r in (straight, resumed))
    assert a["step"] == b["step"] == 6 and a["batches_consumed"] == b["batches_consumed"] == 6 * accumulation
    assert_same_weights(a["model"], b["model"], 1e-6)
    assert_same_weights(a["ema"]["shadow"], b["ema"]["shadow"], 1e-6)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6


@pytest.mark.slow
def test_compiled_training_equals_eager_training(tmp_path):
    """train.compile: the same steps through torch.compile (forward and backward) give the same weights, to the
    reordering of float sums by inductor's fused kernels (1e-4 after 3 AdamW steps on the toy model)."""
    from torch._dynamo.utils import counters

    common = ("train.steps=3", "train.checkpoint_every=3")
    eager = train(toy_config(tmp_path / "eager", *common), Task, toy_data)
    graphs = counters["stats"]["unique_graphs"]
    compiled = train(toy_config(tmp_path / "compiled", *common, "train.compile=true"), Task, toy_data)
    assert counters["stats"]["unique_graphs"] > graphs  # compiled for real
    assert "running it eagerly" not in (compiled / "log.txt").read_text()  # no fallback
    assert_same_weights(final_weights(eager), final_weights(compiled), 1e-4)


def run_toy(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(TESTS), **(env_extra or {})}
    return subprocess.run(args, env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, strategy):
    common = ("train.steps=4", "train.checkpoint_every=4", "train.grad_accumulation=2")
    one = train(toy_config(tmp_path / "one", "train.batch_size=4", *common), Task, toy_data)
    out = run_toy([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(free_port()), str(TESTS / "toy_train_run.py"), str(tmp_path / "two"), "train.batch_size=2",
                   *common, f"train.distributed={strategy}"], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (two,) = (tmp_path / "two").iterdir()
    assert_same_weights(final_weights(one), final_weights(two), 1e-5)
    ema_one = load_checkpoint(one / "ema.safetensors")[0].state_dict()
    ema_two = load_checkpoint(two / "ema.safetensors")[0].state_dict()
    assert_same_weights(ema_one, ema_two, 1e-5)


def test_tensorboard_log_and_exports(tmp_path):
    run = train(toy_config(tmp_path), Task, toy_data)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/samples_per_s", "train/peak_memory_mb",
                "train/mse", "train/vb"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert events.Scalars("train/lr")[0].value == pytest.approx(5e-4)  # warm-up: step 1 of 2
    assert "step 6: loss" in (run / "log.txt").read_text()
    assert (run / "config.yaml").is_file()
    model, cfg, _ = load_checkpoint(run / "ema.safetensors")  # weights-only export with its config
    assert cfg.depth == 2 and cfg.caption_tokens == 8


def test_sample_grid_png(tmp_path, tiny_vae_path):
    cfg = toy_config(tmp_path, "train.sample_every=2", "train.steps=2", "autoencoder.kind=sd-vae",
                     f"autoencoder.path={tiny_vae_path}", "sample.steps=2")
    run = train(cfg, Task, toy_data)
    grid = run / "samples" / "step_00000002.png"
    assert grid.is_file()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Task.loss

    def poisoned(self, model, batch, rng):
        calls["n"] += 1
        loss, terms = original(self, model, batch, rng)
        return (loss * float("nan") if calls["n"] == 5 else loss), terms

    monkeypatch.setattr(Task, "loss", poisoned)
    cfg = toy_config(tmp_path, "train.checkpoint_every=2")
    with pytest.raises(TrainingError) as info:
        train(cfg, Task, toy_data)
    (run,) = tmp_path.iterdir()
    assert "loss is nan at step 5" in str(info.value) and "step_00000004.pt" in str(info.value)
    assert latest_checkpoint(run).name == "step_00000004.pt"
    assert last_state(run)["step"] == 4
    assert not (run / "checkpoints" / "step_00000005.pt").exists()


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    args = [sys.executable, str(TESTS / "toy_train_run.py"), str(tmp_path / "runs"), "train.steps=400",
            "train.checkpoint_every=1000", "train.log_every=1"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(TESTS)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training is under way
        if "step 3:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "--resume" in output
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = last_state(run)
    stopped = ckpt["step"]
    assert 3 <= stopped < 400
    end = stopped + 2
    resumed = train(toy_config(tmp_path / "runs", f"train.steps={end}"), Task, toy_data, resume=str(run))
    straight = train(toy_config(tmp_path / "straight", f"train.steps={end}"), Task, toy_data)
    assert_same_weights(final_weights(resumed), final_weights(straight), 1e-6)


def test_resume_with_another_model_config_lists_the_differences(tmp_path):
    run = train(toy_config(tmp_path, "train.steps=3"), Task, toy_data)
    with pytest.raises(ResumeError) as info:
        train(toy_config(tmp_path, "model.depth=3", "model.mlp_ratio=2.0"), Task, toy_data, resume=str(run))
    message = str(info.value)
    assert "model.depth: 2 -> 3" in message and "model.mlp_ratio: 4.0 -> 2.0" in message


def test_corrupt_or_missing_checkpoint_on_resume(tmp_path):
    run = train(toy_config(tmp_path, "train.steps=3"), Task, toy_data)
    ckpt = latest_checkpoint(run)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ResumeError, match="corrupt or truncated"):
        train(toy_config(tmp_path), Task, toy_data, resume=str(run))
    with pytest.raises(ResumeError, match="no such run folder"):
        train(toy_config(tmp_path), Task, toy_data, resume=str(tmp_path / "nope"))


def test_mixed_precision_and_gradient_checkpointing(tmp_path):
    run = train(toy_config(tmp_path, "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                           "train.steps=2"), Task, toy_data)
    assert all(torch.isfinite(v).all() for v in final_weights(run).values())
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(toy_config(tmp_path, "train.mixed_precision=fp16"), Task, toy_data)


def test_ema_warms_up_then_follows_the_configured_decay():
    from engine.ema import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    decays = []
    for _ in range(9500):  # (1 + n) / (10 + n) passes 0.999 at n = 8991
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays[0] == pytest.approx(0.1) and decays[10] == pytest.approx(11 / 20)
    assert decays[-1] == 0.999 and all(a <= b for a, b in zip(decays, decays[1:]))
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.001 * (model.weight - before))


def test_a_run_folder_taken_between_counting_and_creating_gets_the_next_number(tmp_path, monkeypatch):
    """Two evaluations started together count the same folders; the one that creates NNNNN-name second must take the
    next number instead of failing on the folder the first one made."""
    import engine.state

    assert new_run_dir(tmp_path, "eval").name == "00000-eval"
    monkeypatch.setattr(engine.state, "_next_run_number", lambda root: 0)  # a count made before 00000-eval existed
    assert new_run_dir(tmp_path, "eval").name == "00001-eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-eval", "00001-eval"]

"""The GPU fast path, checked where a CPU can check it: regional compilation, CUDA-graph mode's fallback, the
deferred NaN check, frozen networks stored in bf16, sampler scalars kept on the host, and the GPU-check script."""

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, random_inputs, random_model, tiny_config
from toy_training import ToyLatents, toy_config

from common.errors import UserError
from configs import Config, load_config
from diffusion.samplers.common import per_sample
from diffusion.schedule import NoiseSchedule
from engine.precision import store_frozen
from engine.randomness import SampleRandomness
from models.compiled import CompiledModule, compile_module
from models.pixart import PixArtBlock
from pipeline.generate import FiniteCheck, SamplingError, plan
from tasks.lcd import LCMTask


def step(index: int, value: float, total: int = 5) -> SimpleNamespace:
    return SimpleNamespace(index=index, total=total, timestep=999 - 200 * index, x=torch.full((1, 3, 2, 2), value))


def test_deferred_nan_check_names_the_first_bad_step():
    """On a GPU the flags wait on the device until sampling ends; the message still names the first bad step."""
    check = FiniteCheck(defer=True)
    for i, value in enumerate([0.5, 1.0, float("nan"), float("inf"), 2.0]):
        check(step(i, value))  # no error yet: nothing was read back
    with pytest.raises(SamplingError, match=r"step 3 of 5 \(timestep 599\)"):
        check.raise_if_any()
    check(step(0, 1.0))
    check.raise_if_any()  # all finite: nothing raised, and the earlier flags are gone


def test_immediate_nan_check_on_the_cpu():
    check = FiniteCheck()
    check(step(0, 1.0))
    with pytest.raises(SamplingError, match="step 2 of 5"):
        check(step(1, float("nan")))


def test_sampler_numbers_stay_on_the_host():
    """A number becomes a 0-dim CPU tensor (a kernel argument, no copy to the GPU); per-sample values broadcast."""
    like = torch.zeros(3, 4, 2, 2, dtype=torch.bfloat16)
    c = per_sample(0.25, like)
    assert c.device.type == "cpu" and c.ndim == 0 and c.dtype == torch.float32
    v = per_sample(torch.tensor([1.0, 2.0, 3.0]), like)
    assert v.shape == (3, 1, 1, 1)
    assert torch.equal((like + 1) * per_sample(0.5, like), torch.full_like(like, 0.5))


def test_schedule_copies_its_table_once_per_device():
    schedule = NoiseSchedule.linear()
    x, t = torch.zeros(2, 4, 2, 2), torch.tensor([10, 900])
    schedule.q_sample(x, t, x)
    table = schedule._alphas_cumprod_on(x.device)
    schedule.eps_to_x0(x, t, x)
    assert schedule._alphas_cumprod_on(x.device) is table  # cached, not copied again
    torch.testing.assert_close(schedule.alpha_bar(t, x).flatten(), schedule.alphas_cumprod[t])


def test_cuda_graph_mode_without_a_gpu_compiles_without_graphs(caplog):
    model = random_model(tiny_config())
    with caplog.at_level(logging.WARNING):
        wrapped = compile_module(model, "the transformer", "cpu", mode="reduce-overhead")
    assert isinstance(wrapped, CompiledModule) and not wrapped.cuda_graphs
    assert "records CUDA graphs" in caplog.text
    with pytest.raises(UserError, match="unknown compile mode 'fastest'"):
        compile_module(model, "the transformer", "cpu", mode="fastest")


def test_regional_compile_failure_restores_every_block(monkeypatch, caplog):
    """A dynamo/inductor failure inside a compiled block falls back to eager for every block, with one warning."""
    cfg = tiny_config()
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    with torch.no_grad():
        reference = model(x, t, y, mask)

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("simulated inductor failure")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    blocks = [m for m in model.modules() if isinstance(m, PixArtBlock)]
    wrapped = compile_module(model, "the transformer", "cpu", regions=blocks)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        assert torch.equal(wrapped(x, t, y, mask), reference)
        assert torch.equal(wrapped(x, t, y, mask), reference)
    assert wrapped.eager and caplog.text.count("running it eagerly") == 1


@pytest.mark.slow
def test_regional_compile_traces_one_graph_for_every_block():
    """Blocks share their code: one graph serves all of them (compile time of one block, not of the model)."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(depth=4)
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        reference = model(x, t, y, mask)
        wrapped = compile_module(model, "the transformer", "cpu",
                                 regions=[m for m in model.modules() if isinstance(m, PixArtBlock)])
        out = wrapped(x, t, y, mask)
    assert not wrapped.eager
    assert counters["stats"]["unique_graphs"] == 1
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("key, value, message", [
    ("sample.compile_mode", "fastest", "sample.compile_mode must be one of default"),
    ("sample.compile_scope", "layers", "sample.compile_scope must be one of blocks, model"),
])
def test_bad_compile_settings_are_refused_before_loading(key, value, message):
    with pytest.raises(UserError, match=message):  # by the config loader (Literal fields), before any plan
        plan(load_config(Config, "lcm_shapes", [f"{key}={value}"]), ["a large red circle at the center"])


def test_frozen_networks_in_bf16_and_the_trainable_ones_in_fp32(tmp_path):
    from models.checkpoint import save_checkpoint

    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(random_model(cfg, seed=3, std=0.05).state_dict(), cfg, teacher, "safetensors")
    for lora in (0, 4):
        task = LCMTask(toy_config(tmp_path, f"distill.teacher={teacher}", "train.frozen_dtype=bf16",
                                  f"distill.lora_rank={lora}"), torch.device("cpu"))
        frozen = task.model if lora else task.teacher
        assert all(p.dtype == torch.bfloat16 for p in frozen.parameters() if not p.requires_grad)
        trainable = [p for p in task.model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        data = ToyLatents()
        batch = data.collate([data[i] for i in range(4)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss(task.model, batch, SampleRandomness(0, 0, batch["index"]))
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in trainable)


def test_store_frozen_refuses_an_unknown_dtype():
    with pytest.raises(UserError, match="train.frozen_dtype must be one of fp32, bf16, fp16"):
        store_frozen(torch.nn.Linear(2, 2), "int8")


@pytest.mark.slow
def test_gpu_check_script_runs_its_cli_and_training_checks_at_toy_size(tmp_path):
    """tools/gpu_checks.py --smoke: the same driver at toy sizes on the CPU writes its report and JSON."""
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "tools/gpu_checks.py", "--smoke", "--out", str(out), "--only", "train",
                           "cli", "--cli-cases=--dtype bf16,--control", "--budget-s", "400"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_checks.json").read_text())
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["train"]["exit_code"] == 0 and by_name["train"]["rows"], done.stdout[-2000:]
    cases = {r["case"]: r for r in by_name["cli"]["rows"]}
    assert cases["--dtype bf16"]["verdict"] == "ok" and cases["--control"]["verdict"] == "ok", cases
    assert "## PixArt-alpha training step" in (out / "gpu_checks.md").read_text()

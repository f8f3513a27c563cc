"""8-bit inference (models/quantize.py) and torch.compile (models/compiled.py).

The int8 path is checked against a fake-quantised float model written here from the scheme's definition (one
symmetric scale per weight row and per activation token, scale = max|v| / 127.5, round-half-even of v * (1/scale)
clamped to [-128, 127]): the int8 x int8 -> int32 products are exact, so both agree to float rounding (1e-5),
while the float model differs by the quantisation error itself (about 1e-3 relative here).
"""

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, random_inputs, random_model, tiny_config
from PIL import Image
from torch import nn

from common.errors import UserError
from models import quantize as Q
from models.checkpoint import load_checkpoint, save_checkpoint
from models.compiled import CompiledModule, compile_module

pytest.importorskip("torchao")
convert_main = load_script("tools/convert_checkpoint.py").main
sample_main = load_script("sample/sample.py").main


def fake_quant(v: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantise-dequantise along the last dimension (per row / per token)."""
    scale = v.abs().amax(-1, keepdim=True) / 127.5
    return (v * (1.0 / scale)).round().clamp(-128, 127) * scale


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = fake_quant(linear.weight.detach()), linear.bias

    def forward(self, x):
        return nn.functional.linear(fake_quant(x), self.weight, self.bias)


def with_fake_quant(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, linear in Q.block_linears(model).items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, FakeQuantLinear(linear))
    return model


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(hidden_size=64, caption_tokens=8)
    return cfg, random_model(cfg, std=0.05), random_inputs(cfg, batch=2, height=16, width=16)


def test_every_int8_layer_computes_the_fake_quantised_product(tiny):
    _, model, _ = tiny
    quantized = Q.quantize_transformer(copy.deepcopy(model), "int8")
    gen = torch.Generator().manual_seed(3)
    for name, linear in Q.block_linears(model).items():
        x = torch.randn(2, 50, linear.in_features, generator=gen) * torch.rand(2, 50, 1, generator=gen)
        with torch.inference_mode():
            out, ref = Q.block_linears(quantized)[name](x), FakeQuantLinear(linear)(x)
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max(), name  # int32 sums vs float sums
        assert (out - linear(x)).abs().max() > 1e-4 * ref.abs().max(), name  # really quantised


def test_int8_model_follows_the_fake_quantised_model_and_stays_close_to_float(tiny):
    """Through the blocks, float rounding upstream can move an activation across a rounding tie (one int8 level),
    so the whole model follows the fake-quantised one closely but not bit for bit."""
    cfg, model, (x, t, y, mask, _) = tiny
    quantized = Q.quantize_transformer(copy.deepcopy(model), "int8")
    with torch.inference_mode():
        out, ref, exact = quantized(x, t, y, mask), with_fake_quant(model)(x, t, y, mask), model(x, t, y, mask)
    assert (out - ref).abs().mean() < 0.2 * (out - exact).abs().mean()
    assert 1e-5 < (out - exact).abs().max() / exact.abs().max() < 0.02


def test_only_the_block_linears_are_quantised(tiny):
    _, model, _ = tiny
    quantized = Q.quantize_transformer(copy.deepcopy(model), "int8")
    names = {n for n, p in quantized.named_parameters() if Q._is_quantized_tensor(p)}
    assert names == {f"{n}.weight" for n in Q.block_linears(model)}
    assert len(names) == cfg_depth(model) * 7  # qkv, proj, cross q, kv, proj, fc1, fc2
    assert not Q._is_quantized_tensor(quantized.final_layer.linear.weight)
    assert not Q._is_quantized_tensor(quantized.t_block[1].weight)
    before = {n: p.qdata.clone() for n, p in quantized.named_parameters() if Q._is_quantized_tensor(p)}
    Q.quantize_transformer(quantized, "int8")  # only float block linears are quantised: a second call changes nothing
    assert all(torch.equal(p.qdata, before[n]) for n, p in quantized.named_parameters() if n in before)


def cfg_depth(model) -> int:
    return len(model.blocks)


def test_int8_file_loads_without_requantising_and_runs_identically(tiny, tmp_path, monkeypatch):
    cfg, model, (x, t, y, mask, _) = tiny
    src = save_checkpoint(model.state_dict(), cfg, tmp_path / "float.safetensors", "safetensors",
                          metadata={"config": "diffusion: {prediction: v}\n"})
    dst = tmp_path / "int8.safetensors"
    assert convert_main([str(src), str(dst), "--to", "safetensors", "--quantize", "int8"]) == 0
    in_memory = Q.quantize_transformer(copy.deepcopy(model), "int8")

    monkeypatch.setattr(Q, "quantize_transformer", lambda *a: pytest.fail("the int8 file was re-quantised"))
    loaded, _, report = load_checkpoint(dst)
    assert report.quantization == "int8"
    for name, linear in Q.block_linears(loaded).items():
        assert torch.equal(linear.weight.qdata, Q.block_linears(in_memory)[name].weight.qdata)
    with torch.inference_mode():
        assert torch.equal(loaded(x, t, y, mask), in_memory(x, t, y, mask))
    block_bytes = sum(m.weight.numel() * 4 for m in Q.block_linears(model).values())
    assert src.stat().st_size - dst.stat().st_size > 0.7 * block_bytes  # those weights went fp32 -> int8 (3/4)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["config"] == "diffusion: {prediction: v}\n"  # the run config travels along


def test_int8_weights_file_is_storage_only_and_loads_as_float_within_half_a_step(tiny, tmp_path):
    cfg, model, (x, t, y, mask, _) = tiny
    src = save_checkpoint(model.state_dict(), cfg, tmp_path / "float.safetensors", "safetensors")
    dst = tmp_path / "stored.safetensors"
    assert convert_main([str(src), str(dst), "--to", "safetensors", "--quantize", "int8-weights"]) == 0
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["quantization"] == "int8-weights"
        stored = {k: f.get_tensor(k) for k in f.keys()}
    loaded, _, report = load_checkpoint(dst)
    assert report.quantization == "int8-weights"
    block = {f"{name}.weight" for name in Q.block_linears(model)}
    original, restored = model.state_dict(), loaded.state_dict()
    for key, value in original.items():
        if key == "pos_embed":
            continue
        assert type(restored[key]) is torch.Tensor and restored[key].dtype == torch.float32, key  # plain float
        if key not in block:
            assert torch.equal(restored[key], value), key  # everything outside the block linears untouched
            continue
        q = stored[key]
        assert q.dtype == torch.int8 and q.abs().amax(1).eq(127).all()  # each row's largest |w| maps to 127
        step = value.abs().amax(1, keepdim=True) / 127
        assert ((restored[key] - value).abs() <= step / 2 * (1 + 1e-5)).all(), key  # rounding: half a step at most
        assert (restored[key] - value).abs().max() > 0  # and it did round
    with torch.inference_mode():
        out, ref = loaded(x, t, y, mask), model(x, t, y, mask)
    assert 0 < (out - ref).norm() / ref.norm() < 1e-2
    block_bytes = sum(m.weight.numel() * 4 for m in Q.block_linears(model).values())
    assert src.stat().st_size - dst.stat().st_size > 0.7 * block_bytes


def test_int8_weights_student_samples_in_float_and_takes_a_branch_or_int8_on_top(tmp_path, caplog):
    stored = tmp_path / "student-int8w.safetensors"
    assert convert_main(["weights/shapes/student.safetensors", str(stored), "--to", "safetensors",
                         "--quantize", "int8-weights", "--config", "lcm_shapes"]) == 0
    assert stored.stat().st_size < 0.6 * (ROOT / "weights/shapes/student.safetensors").stat().st_size
    common = ("--config", "lcm_shapes")
    assert shipped(tmp_path / "fp", *common) == 0
    assert shipped(tmp_path / "stored", *common, "--checkpoint", str(stored)) == 0
    for a, b in zip(images(tmp_path / "fp"), images(tmp_path / "stored"), strict=True):
        assert np.abs(a - b).mean() < 0.01  # the same drawing; weights within half an int8 step of fp16
    assert shipped(tmp_path / "q", *common, "--checkpoint", str(stored), "--quantize", "int8") == 0
    assert shipped(tmp_path / "control", *common, "--checkpoint", str(stored),
                   "--control", "docs/examples/triangle_edges.png") == 0  # float once loaded: a branch copies it
    assert "pass the float checkpoint" not in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--to", "official", "--quantize", "int8"], "pass --to safetensors"),
    (["--to", "diffusers", "--quantize", "int8"], "pass --to safetensors"),
])
def test_convert_refuses_int8_outside_safetensors(tiny, tmp_path, caplog, args, message):
    cfg, model, _ = tiny
    src = save_checkpoint(model.state_dict(), cfg, tmp_path / "float.safetensors", "safetensors")
    dst = tmp_path / ("out.pth" if "official" in args else "out")
    assert convert_main([str(src), str(dst), *args]) == 2
    assert message in caplog.text
    assert not dst.exists()


def test_an_int8_file_converts_no_further(tiny, tmp_path, caplog):
    cfg, model, _ = tiny
    src = save_checkpoint(model.state_dict(), cfg, tmp_path / "float.safetensors", "safetensors")
    assert convert_main([str(src), str(tmp_path / "q.safetensors"), "--to", "safetensors", "--quantize", "int8"]) == 0
    assert convert_main([str(tmp_path / "q.safetensors"), str(tmp_path / "x"), "--to", "diffusers"]) == 2
    assert "convert the float checkpoint" in caplog.text


def test_a_damaged_int8_file_is_named(tiny, tmp_path):
    cfg, model, _ = tiny
    sd = Q.quantized_state_dict(Q.quantize_transformer(copy.deepcopy(model), "int8"))
    sd["blocks.0.attn.qkv.weight_scale"] = sd["blocks.0.attn.qkv.weight_scale"][:3]
    path = save_checkpoint(sd, cfg, tmp_path / "bad.safetensors", "safetensors")
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(path)


def test_a_damaged_int8_weights_file_is_named(tiny, tmp_path):
    cfg, model, _ = tiny
    sd = Q.store_int8_weights(model.state_dict(), model)
    sd["blocks.0.mlp.fc1.weight_scale"] = sd["blocks.0.mlp.fc1.weight_scale"][:5]
    path = save_checkpoint(sd, cfg, tmp_path / "bad.safetensors", "safetensors",
                           metadata={"quantization": "int8-weights"})
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(path)


def test_fp8_without_fp8_hardware_falls_back_to_int8_and_unknown_modes_are_refused(caplog):
    with caplog.at_level(logging.WARNING):
        assert Q.resolve_mode("fp8", "cpu") == "int8"
    assert "compute capability 8.9" in caplog.text and "runs in int8 instead" in caplog.text
    with pytest.raises(UserError, match="unknown quantization 'int4'"):
        Q.resolve_mode("int4", "cpu")
    assert Q.resolve_mode("int8", "cpu") == "int8"


# ----------------------------------------------------------------------------------------------------------
# sample.py


def shipped(tmp_path, *args):
    return sample_main(["--prompt", "a large red circle at the center", "--prompt", "a small blue square at the top "
                        "left", "--out", str(tmp_path / "out"), "--no-progress", *args])


def images(tmp_path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.float64) / 255 for p in sorted((tmp_path / "out").glob("*/0*.png"))]


def test_shipped_student_in_int8_draws_what_fp32_draws(tmp_path):
    assert shipped(tmp_path / "fp32") == 0
    assert shipped(tmp_path / "int8", "--quantize", "int8") == 0
    for a, b in zip(images(tmp_path / "fp32"), images(tmp_path / "int8"), strict=True):
        assert np.abs(a - b).mean() < 0.01  # measured 0.001-0.003: same drawing, a few pixel levels apart


def test_int8_file_samples_as_quantised_at_load_and_half_dtype_falls_back_on_cpu(tmp_path, caplog):
    int8 = tmp_path / "student-int8.safetensors"
    assert convert_main(["weights/shapes/student.safetensors", str(int8), "--to", "safetensors",
                         "--quantize", "int8"]) == 0
    lcd = ("--config", "lcm_shapes")  # the LCD student's preset, whose checkpoint the int8 file holds
    assert shipped(tmp_path / "file", *lcd, "--checkpoint", str(int8), "--quantize", "int8") == 0  # (T5 in int8 too)
    with caplog.at_level(logging.WARNING):
        assert shipped(tmp_path / "flag", *lcd, "--quantize", "int8", "--dtype", "bf16") == 0
    assert "computes in fp32" in caplog.text
    for a, b in zip(images(tmp_path / "file"), images(tmp_path / "flag"), strict=True):
        assert np.array_equal(a, b)  # the saved int8 weights are exactly the ones quantised at load
    caplog.clear()
    edges = "docs/examples/triangle_edges.png"
    assert shipped(tmp_path / "control", *lcd, "--checkpoint", str(int8), "--control", edges) == 2
    assert "pass the float checkpoint with --quantize int8" in caplog.text
    assert not (tmp_path / "control" / "out").exists()
    assert shipped(tmp_path / "fp8", *lcd, "--quantize", "fp8") == 0  # no fp8 on this CPU: int8, said so
    assert "runs in int8 instead" in caplog.text
    for a, b in zip(images(tmp_path / "fp8"), images(tmp_path / "flag"), strict=True):
        assert np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# torch.compile


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny, monkeypatch, caplog):
    cfg, model, (x, t, y, mask, _) = tiny

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("simulated inductor failure")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: broken)
    wrapped = compile_module(model, "the transformer", "cpu")
    assert isinstance(wrapped, CompiledModule)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        out = wrapped(x, t, y, mask)
        assert torch.equal(out, model(x, t, y, mask))
    assert "simulated inductor failure" in caplog.text and "running it eagerly" in caplog.text
    assert wrapped.in_channels == model.in_channels


def test_compile_without_a_cpp_compiler_runs_eagerly(tiny, monkeypatch, caplog):
    _, model, _ = tiny
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert compile_module(model, "the transformer", "cpu") is model
    assert "no C++ compiler" in caplog.text


def test_a_model_error_is_not_taken_for_a_compile_failure(tiny, monkeypatch):
    _, model, (x, t, y, mask, _) = tiny
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    wrapped = compile_module(model, "the transformer", "cpu")
    with pytest.raises(ValueError, match="expected latents"):
        wrapped(x[:, :2], t, y, mask)  # wrong channel count: a real error keeps its traceback


@pytest.mark.slow
def test_compiled_int8_transformer_matches_eager(tiny):
    """Inductor fuses the activation quantisation and reorders float sums: equal to 1e-4 of the output scale (a
    value landing on a rounding tie of the activation quantisation may flip one int8 level)."""
    _, model, (x, t, y, mask, _) = tiny
    quantized = Q.quantize_transformer(copy.deepcopy(model), "int8")
    compiled = compile_module(quantized, "the transformer", "cpu")
    with torch.inference_mode():
        eager, fast = quantized(x, t, y, mask), compiled(x, t, y, mask)
    assert not compiled.eager
    assert (fast - eager).abs().max() < 1e-3 * eager.abs().max()


def test_demo_quantises_the_base_and_its_control_branch():
    """The demo's controlled model (shipped student + shipped ControlNet branch) in int8: every block linear of both
    is int8, and a steered image stays within a few levels of the float one."""
    from configs import Config, load_config

    demo = load_script("tools/demo.py")
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = edges[8:24, 23] = edges[8, 8:24] = edges[23, 8:24] = 255
    results = {}
    for mode in ("none", "int8"):
        engine = demo.Engine(load_config(Config, "lcm_shapes", [f"sample.quantize={mode}"]), "student")
        linears = Q.block_linears(engine.controlled)
        assert any("branch" in name for name in linears)
        assert all(Q._is_quantized_tensor(m.weight) == (mode == "int8") for m in linears.values())
        image, control = engine.draw("a large red square at the center", 0, 32, 32, Image.fromarray(edges), 1.0,
                                     sampler="lcm", steps=4, guidance=0.0)
        assert control is not None
        results[mode] = image.permute(1, 2, 0).double().numpy()
    assert np.abs(results["int8"] - results["none"]).mean() < 0.01

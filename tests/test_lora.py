"""LCM-LoRA adapters: what this project exports loads with peft onto diffusers' PixArtTransformer2DModel and gives
the same output as our adapted model; folding the adapters in gives it too."""

import json

import pytest
import torch
from conftest import random_inputs, random_model, tiny_config
from diffusers import PixArtTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from models.lora import add_lora, merged_state_dict, save_diffusers_lora, scaling
from models.pixart import build_pixart
from tools.convert_checkpoint import main as convert

TOL = 1e-4  # the transformer's own parity with diffusers (tests/test_parity_diffusers.py)


@pytest.fixture
def adapted(tmp_path):
    """A random tiny model (saved as an official .pth), then rank-4 adapters with random non-zero B."""
    import yaml

    cfg = tiny_config()
    base = random_model(cfg)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": cfg.__dict__}))
    model = add_lora(random_model(cfg), rank=4, alpha=8)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return cfg, model.eval()


def test_exported_adapters_load_onto_diffusers_with_peft(adapted, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    cfg, model = adapted
    assert convert([str(tmp_path / "base.pth"), str(tmp_path / "hf"), "--to", "diffusers", "--config",
                    str(tmp_path / "tiny.yaml")]) == 0
    save_diffusers_lora(model.state_dict(), 4, 8, tmp_path / "student.lora.safetensors")
    with safe_open(tmp_path / "student.lora.safetensors", "pt") as f:
        config = LoraConfig(**json.loads(f.metadata()["lora_config"]))
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf", subfolder="transformer").eval()
    inject_adapter_in_model(config, ref)
    result = set_peft_model_state_dict(ref, load_file(tmp_path / "student.lora.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]  # every adapter of the config got its weights
    x, t, y, mask, _ = random_inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, y, mask)
        theirs = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        base = build_pixart(cfg).eval()
        base.load_state_dict(torch.load(tmp_path / "base.pth", weights_only=True))
        plain = base(x, t, y, mask)
    assert (ours - plain).abs().max() > 0.1  # the adapters matter, so the comparison below can fail
    assert (ours - theirs).abs().max().item() <= TOL


def test_merged_weights_equal_the_adapted_model(adapted):
    cfg, model = adapted
    merged = build_pixart(cfg).eval()
    merged.load_state_dict(merged_state_dict(model.state_dict(), scaling(4, 8)))
    x, t, y, mask, _ = random_inputs(cfg)
    with torch.no_grad():
        # W x + B (A x) against (W + B A) x: float32 reassociation on outputs of magnitude ~10 (random weights)
        torch.testing.assert_close(merged(x, t, y, mask), model(x, t, y, mask), rtol=0, atol=TOL)


def test_exporting_a_model_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_diffusers_lora(random_model(tiny_config()).state_dict(), 4, None, tmp_path / "x.safetensors")

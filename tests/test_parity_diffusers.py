"""Numerical parity with diffusers.PixArtTransformer2DModel on the same random weights (fp32, max |diff| <= 1e-4)."""

import pytest
import torch
import yaml
from conftest import random_inputs, random_model, tiny_config
from diffusers import PixArtTransformer2DModel

from models.checkpoint import load_checkpoint
from tools.convert_checkpoint import main as convert

TOL = 1e-4


def diffusers_forward(ref, x, t, y, mask, micro):
    added = micro if micro else {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added,
                   encoder_attention_mask=mask).sample


def official_file(tmp_path, cfg, seed=0):
    """An official-layout .pth (bare state dict, no config beside it) and a YAML config for it."""
    model = random_model(cfg, seed)
    src = tmp_path / "official.pth"
    torch.save(model.state_dict(), src)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": cfg.__dict__}))
    return model, src, config


@pytest.mark.parametrize("micro", [False, True], ids=["plain", "micro-conditions"])
@pytest.mark.parametrize("hw", [(16, 16), (16, 24)], ids=["square", "wide"])
@pytest.mark.parametrize("padded", [False, True], ids=["full-caption", "padded-caption"])
def test_forward_matches_diffusers_through_converter(tmp_path, micro, hw, padded):
    cfg = tiny_config(micro_conditions=micro, pe_interpolation=2.0 if micro else 1.0)
    model, src, config = official_file(tmp_path, cfg)
    assert convert([str(src), str(tmp_path / "hf"), "--to", "diffusers", "--config", str(config)]) == 0
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf", subfolder="transformer").eval()
    x, t, y, mask, kw = random_inputs(cfg, height=hw[0], width=hw[1], padded=padded)
    with torch.no_grad():
        ours = model(x, t, y, mask, **kw)
    theirs = diffusers_forward(ref, x, t, y, mask, kw)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single-file", "sharded"])
def test_diffusers_written_folder_loads_and_matches(tmp_path, shard):
    """diffusers writes the folder itself (save_pretrained, optionally sharded); our loader reads it."""
    cfg = tiny_config(micro_conditions=True, latent_size=32, pe_interpolation=2.0)
    _, src, config = official_file(tmp_path, cfg)
    convert([str(src), str(tmp_path / "hf"), "--to", "diffusers", "--config", str(config)])
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf", subfolder="transformer").eval()
    out = tmp_path / "saved_by_diffusers"
    ref.save_pretrained(out, max_shard_size=shard or "10GB")
    assert bool(list(out.glob("*.index.json"))) == (shard is not None)
    model, loaded_cfg, report = load_checkpoint(out)
    assert loaded_cfg.micro_conditions and loaded_cfg.pe_interpolation == 2.0 and loaded_cfg.latent_size == 32
    assert not report.null_caption  # diffusers does not store y_embedding
    x, t, y, mask, kw = random_inputs(cfg, height=32, width=16)
    with torch.no_grad():
        ours = model(x, t, y, mask, **kw)
    assert (ours - diffusers_forward(ref, x, t, y, mask, kw)).abs().max().item() <= TOL


def test_diffusers_default_interpolation_and_micro_conditions(tmp_path):
    """A config.json without interpolation_scale / use_additional_conditions takes diffusers' defaults."""
    ref = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=24, num_layers=1, sample_size=128,
                                   caption_channels=32, cross_attention_dim=48).eval()
    ref.save_pretrained(tmp_path / "transformer")
    model, cfg, _ = load_checkpoint(tmp_path)
    assert cfg.micro_conditions and cfg.pe_interpolation == 2.0 and cfg.depth == 1 and cfg.num_heads == 2
    x, t, y, mask, kw = random_inputs(cfg, height=16, width=24)
    with torch.no_grad():
        ours = model(x, t, y, mask, **kw)
    assert (ours - diffusers_forward(ref, x, t, y, mask, kw)).abs().max().item() <= TOL

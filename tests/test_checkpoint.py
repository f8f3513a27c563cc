"""Checkpoint formats: detection, bit-exact round trips, and a clear error for every bad file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_inputs, random_model, tiny_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from models.checkpoint import (
    CheckpointError,
    detect_format,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tools.convert_checkpoint import main as convert

ROOT = Path(__file__).resolve().parents[1]


def write_official(path, model, cfg, wrapper=True, pos_embed=True):
    """An official .pth written the way the PixArt-alpha repository writes it (pos_embed from diffusers' code)."""
    sd = dict(model.state_dict())
    if pos_embed:
        grid = cfg.latent_size // cfg.patch_size
        pos = get_2d_sincos_pos_embed(cfg.hidden_size, grid, base_size=grid,
                                      interpolation_scale=cfg.pe_interpolation, output_type="pt")
        sd["pos_embed"] = pos.float()[None]
    torch.save({"state_dict": sd} if wrapper else sd, path)
    return path


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrapper", [True, False], ids=["state_dict-wrapper", "bare"])
@pytest.mark.parametrize("pos_embed", [True, False], ids=["with-pos_embed", "without-pos_embed"])
def test_official_variants_load_identically(tmp_path, wrapper, pos_embed):
    cfg = tiny_config(pe_interpolation=0.5)
    model = random_model(cfg)
    path = write_official(tmp_path / "m.pth", model, cfg, wrapper, pos_embed)
    assert detect_format(path) == "official"
    loaded, _, report = load_checkpoint(path, cfg)
    assert report.format == "official" and report.null_caption
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_official_config_read_off_pos_embed(tmp_path):
    cfg = tiny_config(hidden_size=144, num_heads=2, latent_size=32, pe_interpolation=2.0, micro_conditions=True)
    path = write_official(tmp_path / "m.pth", random_model(cfg), cfg)
    _, inferred, _ = load_checkpoint(path)  # no config given, none beside the file: heads = 144 / 72
    assert (inferred.latent_size, inferred.pe_interpolation, inferred.micro_conditions) == (32, 2.0, True)
    assert (inferred.depth, inferred.hidden_size, inferred.num_heads, inferred.caption_tokens) == (2, 144, 2, 8)


@pytest.mark.parametrize("chain", [
    ["diffusers", "safetensors", "official"],
    ["safetensors", "diffusers", "official"],
    ["official", "safetensors", "diffusers", "official"],
])
def test_round_trips_are_bit_exact(tmp_path, chain):
    cfg = tiny_config(micro_conditions=True)
    model = random_model(cfg)
    start = save_checkpoint(model.state_dict(), cfg, tmp_path / "start.pth", "official")
    src = start
    for i, fmt in enumerate(chain):
        dst = tmp_path / f"step{i}.{ {'official': 'pth', 'safetensors': 'safetensors'}.get(fmt, 'dir') }"
        assert convert([str(src), str(dst), "--to", fmt]) == 0
        assert detect_format(dst) == fmt
        src = dst
    first, last = torch.load(start, weights_only=True), torch.load(src, weights_only=True)
    assert_same_tensors(first["state_dict"], last["state_dict"])
    side = lambda p: yaml.safe_load(p.with_suffix(".yaml").read_text())  # noqa: E731
    assert side(src) == side(start)


def test_sharded_diffusers_round_trip(tmp_path):
    cfg = tiny_config()
    model = random_model(cfg)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "hf", "diffusers", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf/transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path / "hf")
    assert loaded_cfg == cfg.resolved()
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_safetensors_carries_config_and_dtype_cast(tmp_path):
    cfg = tiny_config(learn_sigma=False)
    model = random_model(cfg)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "a.safetensors", "safetensors")
    assert convert([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--to", "safetensors",
                    "--dtype", "bf16"]) == 0
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path / "b.safetensors")
    assert loaded_cfg == cfg.resolved() and loaded.final_layer.linear.weight.dtype == torch.bfloat16
    x, t, y, mask, _ = random_inputs(cfg)
    assert loaded.float()(x, t, y, mask).shape == (2, 4, 16, 16)


def test_load_casts_and_places(tmp_path):
    cfg = tiny_config()
    path = save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "m.safetensors", "safetensors")
    model, _, _ = load_checkpoint(path, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in model.parameters()) and not model.training


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def expect_error(path, cfg, *patterns):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, cfg)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    return str(info.value)


def test_pixart_sigma_checkpoint_is_named(tmp_path):
    sigma = tiny_config(caption_tokens=300)
    path = write_official(tmp_path / "sigma.pth", random_model(sigma), sigma)
    expect_error(path, tiny_config(), "PixArt-Sigma", "300 caption tokens", "y_embedder.y_embedding")


def test_ms_checkpoint_into_plain_config(tmp_path):
    ms = tiny_config(micro_conditions=True)
    path = write_official(tmp_path / "ms.pth", random_model(ms), ms)
    msg = expect_error(path, tiny_config(), "multi-scale (MS", "model.micro_conditions=true",
                       "unexpected keys", "csize_embedder.mlp.0.weight")
    assert "missing keys" not in msg


def test_plain_checkpoint_into_ms_config(tmp_path):
    cfg = tiny_config()
    path = write_official(tmp_path / "plain.pth", random_model(cfg), cfg)
    expect_error(path, tiny_config(micro_conditions=True), "has no csize/ar embedders", "missing keys",
                 "ar_embedder.mlp.2.bias")


def test_depth_and_width_mismatch_list_keys_and_fix(tmp_path):
    cfg = tiny_config(depth=3)
    path = write_official(tmp_path / "deep.pth", random_model(cfg), cfg)
    expect_error(path, tiny_config(), "depth=3", "--set model.depth=3", "blocks.2.attn.qkv.weight")
    wide = tiny_config(hidden_size=96)
    path = write_official(tmp_path / "wide.pth", random_model(wide), wide)
    expect_error(path, tiny_config(), "hidden_size=96", "shape mismatches",
                 "blocks.0.attn.qkv.weight: checkpoint (288, 96), model (144, 48)", "... and 32 more")


def test_pos_embed_of_another_resolution_is_named(tmp_path):
    cfg = tiny_config(pe_interpolation=2.0, latent_size=32)
    path = write_official(tmp_path / "m.pth", random_model(cfg), cfg)
    expect_error(path, tiny_config(pe_interpolation=1.0, depth=3), "pe_interpolation=2.0 (latent_size 32)")


@pytest.mark.parametrize("keys,kind", [
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}, "T5 text-encoder"),
    ({"decoder.up_blocks.0.resnets.0.conv1.weight": (4, 4), "quant_conv.weight": (4, 4)}, "VAE"),
    ({"base_model.x_embedder.proj.weight": (4, 4), "controlnet.0.before_proj.weight": (4, 4)}, "ControlNet"),
])
def test_checkpoint_of_another_model_is_named(tmp_path, keys, kind):
    path = tmp_path / "other.pth"
    torch.save({k: torch.zeros(s) for k, s in keys.items()}, path)
    expect_error(path, tiny_config(), kind)
    with pytest.raises(CheckpointError, match=kind):
        load_checkpoint(path)  # without a config too


def test_corrupt_files(tmp_path):
    cfg = tiny_config()
    model = random_model(cfg)
    pth = save_checkpoint(model.state_dict(), cfg, tmp_path / "m.pth", "official")
    st = save_checkpoint(model.state_dict(), cfg, tmp_path / "m.safetensors", "safetensors")
    for good, ext in ((pth, "pth"), (st, "safetensors")):
        bad = tmp_path / f"truncated.{ext}"
        bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
        expect_error(bad, cfg, "corrupt or truncated", str(bad))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    expect_error(garbage, cfg, "corrupt or truncated")
    expect_error(tmp_path / "missing.pth", cfg, "does not exist")
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], notdict)
    expect_error(notdict, cfg, "holds no tensor state dict")


def test_bad_diffusers_folders(tmp_path):
    cfg = tiny_config()
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", None, "is not a diffusers PixArt transformer")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    expect_error(vae, None, "describes a AutoencoderKL")
    save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "hf", "diffusers", max_shard_bytes=20_000)
    next((tmp_path / "hf/transformer").glob("*-00002-of-*.safetensors")).unlink()
    expect_error(tmp_path / "hf", None, "shard", "is missing")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "hf", "diffusers")


def test_converter_cli_errors_exit_nonzero_and_keep_existing_output(tmp_path, caplog):
    cfg = tiny_config()
    model = random_model(cfg)
    src = tmp_path / "bare.pth"
    torch.save(model.state_dict(), src)  # no pos_embed, no config beside it
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    # The real command line once: exit status and message as a user sees them.
    result = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), str(src), str(dst),
                             "--to", "safetensors"], capture_output=True, text=True)
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stdout

    def run(*args):
        caplog.clear()
        return convert([str(src), str(dst), "--to", "safetensors", "--overwrite", *args]), caplog.text

    code, text = run()
    assert code == 2 and "without a config" in text and "--config" in text
    code, text = run("--config", "pixart_xl2_256")
    assert code == 2 and "hidden_size=48" in text
    assert dst.read_bytes() == b"precious" and not list(tmp_path.glob(".*tmp"))
    sets = ["model.hidden_size=48", "model.depth=2", "model.num_heads=4", "model.caption_channels=32",
            "model.caption_tokens=8", "model.latent_size=16", "model.pe_interpolation=1.0"]
    code, text = run("--config", "pixart_xl2_256", *[a for s in sets for a in ("--set", s)])
    assert code == 0, text
    assert_same_tensors(read_checkpoint(dst).state_dict, model.state_dict())
    code, text = run("--config", "pixart_xl2_256", "--set", "model.depht=2")
    assert code == 2 and "did you mean 'model.depth'" in text


def test_loading_does_not_need_twice_the_checkpoint_in_ram(tmp_path):
    """Peak RSS growth while loading stays well under 2x the file size (meta build + assign, mmap reads)."""
    cfg = tiny_config(arch="S", depth=6, hidden_size=None, num_heads=None, caption_channels=1024)
    model = build = random_model(cfg, std=0.02)
    files = {"official": save_checkpoint(build.state_dict(), cfg, tmp_path / "m.pth", "official"),
             "diffusers": save_checkpoint(build.state_dict(), cfg, tmp_path / "hf", "diffusers")}
    size = sum(p.numel() * 4 for p in model.parameters()) + model.y_embedder.y_embedding.numel() * 4
    del model, build
    code = (  # VmHWM is the peak RSS since the reset written to clear_refs
        "import re, sys, torch\n"
        "from models.checkpoint import load_checkpoint\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        "model, _, _ = load_checkpoint(sys.argv[1])\n"
        "print(status('VmHWM') - before)\n"
    )
    for fmt, path in files.items():
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        growth = int(out.stdout.strip().splitlines()[-1])
        assert growth < 1.5 * size, f"{fmt}: RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_exports_are_byte_reproducible_across_processes(tmp_path):
    """safetensors' metadata order changed from process to process: the same conversion gave other bytes. Two
    processes convert the shipped student, and two write a file with twenty metadata keys: equal sha256 each."""
    import hashlib
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    student = root / "weights" / "shapes" / "student.safetensors"
    write = ("import sys, torch; from common.safetensors_file import save_file; "
             "save_file({'w': torch.arange(6.0)}, sys.argv[1], metadata={f'key{i}': str(i) for i in range(20)})")
    digests = {"convert": set(), "metadata": set()}
    for i in range(2):
        out = tmp_path / f"student{i}.safetensors"
        subprocess.run([sys.executable, str(root / "tools/convert_checkpoint.py"), str(student), str(out), "--to",
                        "safetensors"], check=True, cwd=root, timeout=120, capture_output=True)
        digests["convert"].add(hashlib.sha256(out.read_bytes()).hexdigest())
        many = tmp_path / f"many{i}.safetensors"
        subprocess.run([sys.executable, "-c", write, str(many)], check=True, cwd=root, timeout=120)
        digests["metadata"].add(hashlib.sha256(many.read_bytes()).hexdigest())
    assert len(digests["convert"]) == 1 and len(digests["metadata"]) == 1, digests
    from safetensors import safe_open

    with safe_open(str(many), "pt") as f:
        assert f.metadata() == {f"key{i}": str(i) for i in range(20)}
        assert torch.equal(f.get_tensor("w"), torch.arange(6.0))

"""PixArt-Sigma as a variant: the transformer and the whole pipeline against diffusers (PixArtTransformer2DModel in
its Sigma configuration, PixArtSigmaPipeline) on random weights, official .pth <-> diffusers conversions bit for bit,
KV compression against a reference written from the paper's definition (and its exact bound), and the bad inputs
of issue 22. Nothing is downloaded: the tests write tiny random T5, VAE and transformer folders."""

import copy
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import load_script, random_inputs, random_model, tiny_config
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from toy_training import ToyLatents, last_state, toy_config

from common.errors import CheckpointError, UserError
from configs import Config, ConfigError, load_config
from data.buckets import BucketBatchSampler
from engine.loop import train
from models.attention import KVCompressionError, SelfAttention
from models.autoencoder import load_autoencoder
from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from models.pixart import build_pixart
from models.text_encoder import load_text_encoder
from models.variants import SIGMA, VARIANTS, detect_variants
from pipeline.generate import Timings, encode_prompts, initial_noise, load_denoiser, plan, sample_images
from tasks.controlnet import ControlNetTask
from tasks.lcd import LCMTask
from tools.convert_checkpoint import main as convert
from tools.random_weights import write_random_pipeline

TOL = 1e-4
PROMPTS = ["a large red circle at the top left", "two small blue squares"]
SDXL_VAE = {"scaling_factor": 0.13025}  # what the SDXL VAE's config.json says (PixArt-Sigma's autoencoder)


def sigma_config(**overrides):
    """A tiny Sigma-1024-MS-like model: 300 caption tokens, no micro-conditions, 128 latent side, scale 2."""
    return tiny_config(**{"caption_channels": 32, "caption_tokens": 300, "latent_size": 128, "pe_interpolation": 2.0,
                          "micro_conditions": False, **overrides})


def diffusers_forward(ref, x, t, y, mask):
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


# ----------------------------------------------------------------------------------------------------------
# The transformer and conversions


@pytest.mark.parametrize("latent_size,scale", [(64, 1.0), (128, 2.0), (256, 4.0)], ids=["512", "1024-MS", "2K"])
def test_sigma_transformer_matches_diffusers(tmp_path, latent_size, scale):
    """Each Sigma resolution's positional interpolation; at 128 (1024-MS) diffusers would add micro-conditions by
    default: the written config says use_additional_conditions false, as the released Sigma configs do."""
    cfg = sigma_config(latent_size=latent_size, pe_interpolation=scale)
    model = random_model(cfg)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "hf", "diffusers")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf", subfolder="transformer").eval()
    assert ref.config.use_additional_conditions is False and ref.config.interpolation_scale == scale
    x, t, y, mask, _ = random_inputs(cfg, height=16, width=24)
    with torch.no_grad():
        ours = model(x, t, y, mask)
    assert (ours - diffusers_forward(ref, x, t, y, mask)).abs().max().item() <= TOL


def test_official_sigma_pth_and_diffusers_folder_convert_both_ways_bit_exactly(tmp_path):
    cfg = sigma_config()
    sd = random_model(cfg, seed=5).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "PixArt-Sigma-XL-2-1024-MS.pth")  # as the official repository
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": asdict(cfg)}))
    src = tmp_path / "PixArt-Sigma-XL-2-1024-MS.pth"
    assert convert([str(src), str(tmp_path / "hf"), "--to", "diffusers", "--config", str(config)]) == 0
    assert convert([str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    back = read_checkpoint(tmp_path / "back.pth").state_dict
    assert set(back) - {"pos_embed"} == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    model, loaded, _ = load_checkpoint(tmp_path / "hf")
    assert loaded.caption_tokens == 300 and not loaded.micro_conditions
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_kv_compressed_model_round_trips_and_diffusers_refuses_it(tmp_path):
    cfg = sigma_config(kv_compress_blocks=[1])
    sd = random_model(cfg).state_dict()
    assert sd["blocks.1.attn.sr.weight"].shape == (48, 1, 2, 2) and "blocks.1.attn.norm.weight" in sd  # official
    assert "blocks.0.attn.sr.weight" not in sd
    for fmt, name in (("official", "m.pth"), ("safetensors", "m.safetensors")):
        save_checkpoint(sd, cfg, tmp_path / name, fmt)
        model, loaded, _ = load_checkpoint(tmp_path / name)
        assert loaded.kv_compress_blocks == [1]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="no KV compression"):
        save_checkpoint(sd, cfg, tmp_path / "hf", "diffusers")


def test_detection_names_sigma_and_its_variants():
    assert [v.name for v in detect_variants({"caption_tokens": 300, "micro_conditions": False})] == \
        ["sigma-512", "sigma-1024-ms", "sigma-2k"]
    seen = {"caption_tokens": 300, "micro_conditions": False, "latent_size": 256, "pe_interpolation": 4.0}
    assert [v.name for v in detect_variants(seen)] == ["sigma-2k"]
    assert [v.name for v in detect_variants({"caption_tokens": 120, "micro_conditions": True, "latent_size": 128,
                                             "pe_interpolation": 2.0})] == ["alpha-1024-ms"]
    assert all(v.family is SIGMA for v in VARIANTS.values() if v.name.startswith("sigma"))


# ----------------------------------------------------------------------------------------------------------
# KV compression


def reference_compressed_attention(attn: SelfAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The paper's definition written out with loops: keys and values (not queries) of the token grid, each
    s x s cell reduced by the per-channel kernel (sum_ab W[c, a, b] k[c, si+a, sj+b] + bias[c]), then the
    official LayerNorm; softmax(q k^T / sqrt(d)) v per head."""
    n, t, d = x.shape
    s, heads = attn.kv_stride, attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)  # (N, T, D) each
    weight, bias = attn.sr.weight[:, 0], attn.sr.bias  # (D, s, s), (D,)

    def cells(z):
        grid = z.reshape(n, h, w, d)
        out = torch.zeros(n, h // s, w // s, d, dtype=z.dtype)
        for i in range(h // s):
            for j in range(w // s):
                patch = grid[:, i * s:(i + 1) * s, j * s:(j + 1) * s]  # (N, s, s, D)
                out[:, i, j] = (patch * weight.permute(1, 2, 0)).sum((1, 2)) + bias
        return attn.norm(out.reshape(n, -1, d))

    k, v = cells(k), cells(v)
    dh = d // heads
    outs = []
    for head in range(heads):
        sl = slice(head * dh, (head + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)  # (N, T, T/s^2)
        outs.append(scores.softmax(-1) @ v[..., sl])
    return torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("norm", [True, False], ids=["official-layernorm", "paper-average"])
def test_kv_compression_equals_the_reference(norm):
    torch.manual_seed(0)
    attn = SelfAttention(48, 4, kv_stride=2, kv_norm=norm)
    with torch.no_grad():  # every weight random, the convolution too
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.randn(2, 6 * 8, 48)
        assert torch.allclose(attn(x, (6, 8)), reference_compressed_attention(attn, x, 6, 8), atol=1e-5)


def smooth_tokens(n, h, w, d, seed=0):
    """Tokens that vary slowly over the grid: a few low-frequency sinusoids per channel."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    amp, fy, fx, ph = torch.rand(4, n, 1, 1, d, generator=gen)  # each (N, 1, 1, D): under one cycle per grid
    field = amp * torch.sin(2 * math.pi * (fy * ys[None, :, :, None] + fx * xs[None, :, :, None]) + 6 * ph)
    return field.reshape(n, h * w, d)


def test_fresh_average_compression_is_exact_on_cell_constant_tokens_and_within_its_bound_on_smooth_ones():
    """Keys k_j, values v_j in cells c; the average gives the cell means. If every token of a cell is equal, the
    compressed attention equals the uncompressed one (each key repeated s^2 times is one key). Otherwise, per query
    q and head: |q.k_j - q.kbar_c| / sqrt(d) <= eps := |q| max_j |k_j - kbar_c| / sqrt(d), so the attention weights
    differ from the cells' weights spread evenly by a ratio within e^(+-2 eps), and
        |o - o_compressed| <= max_j |v_j - vbar_c| + (e^(2 eps) - 1) max_c |vbar_c|.
    """
    torch.manual_seed(1)
    full = SelfAttention(48, 4)
    comp = SelfAttention(48, 4, kv_stride=2, kv_norm=False)  # the paper's plain average, freshly initialised
    comp.load_state_dict(full.state_dict(), strict=False)
    h, w, d, heads, dh = 8, 8, 48, 4, 12
    with torch.no_grad():
        cell = torch.randn(2, h // 2, w // 2, d).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, h * w, d)
        assert torch.allclose(full(cell, (h, w)), comp(cell, (h, w)), atol=1e-5)

        x = smooth_tokens(2, h, w, d)
        q, k, v = full.qkv(x).split(d, dim=-1)
        qh, kh, vh = (z.reshape(2, h * w, heads, dh).transpose(1, 2) for z in (q, k, v))  # (N, H, T, dh)
        exact = F.scaled_dot_product_attention(qh, kh, vh)
        kc, vc = (comp.sr(z.transpose(1, 2).reshape(2, d, h, w)).flatten(2).transpose(1, 2) for z in (k, v))
        kch, vch = (z.reshape(2, -1, heads, dh).transpose(1, 2) for z in (kc, vc))
        approx = F.scaled_dot_product_attention(qh, kch, vch)  # (N, H, T, dh) the compressed layer's attention

        def spread(z):  # each token's cell mean, (N, H, T, dh)
            grid = z.reshape(2, heads, h // 2, w // 2, dh)
            return grid.repeat_interleave(2, 2).repeat_interleave(2, 3).reshape(2, heads, h * w, dh)

        dk = (kh - spread(kch)).norm(dim=-1).amax(-1, keepdim=True)  # (N, H, 1)
        dv = (vh - spread(vch)).norm(dim=-1).amax(-1)  # (N, H)
        eps = qh.norm(dim=-1) * dk / math.sqrt(dh)  # (N, H, T)
        bound = dv[..., None] + torch.expm1(2 * eps) * vch.norm(dim=-1).amax(-1)[..., None]
        err = (exact - approx).norm(dim=-1)  # (N, H, T)
        assert (err <= bound + 1e-6).all()
        assert err.max() > 0 and (err / bound).max() < 1  # the bound is not vacuous: tight within a factor
        layer = (full(x, (h, w)) - comp(x, (h, w))).abs().max()
        assert layer < 0.05 * full(x, (h, w)).abs().max()


def test_fresh_compressed_model_is_close_to_the_uncompressed_one_on_smooth_latents():
    """Half the blocks compressed with the paper's average: a model stays within a few percent of its uncompressed
    self on smooth latents; with the official LayerNorm after the average a fresh layer is not (it normalises the
    keys and values), so the official code's compression needs training to match."""
    cfg = sigma_config(latent_size=32, depth=4)
    base = random_model(cfg, std=0.1)
    x = smooth_tokens(2, 16, 16, 4).reshape(2, 16, 16, 4).permute(0, 3, 1, 2).contiguous()
    _, t, y, mask, _ = random_inputs(cfg, height=16, width=16)
    with torch.no_grad():
        ref = base(x, t, y, mask)
        errors = {}
        for norm in (False, True):
            comp = build_pixart(sigma_config(latent_size=32, depth=4, kv_compress_blocks=[2, 3], kv_compress_norm=norm))
            comp.load_state_dict(base.state_dict(), strict=False)
            errors[norm] = ((comp(x, t, y, mask) - ref).norm() / ref.norm()).item()
    assert errors[False] < 0.01  # measured 0.16% (0.8% on white-noise latents)
    assert errors[True] > 10 * errors[False]  # measured 12%


def test_kv_compression_refuses_a_grid_the_stride_does_not_divide():
    model = build_pixart(sigma_config(latent_size=32, kv_compress_blocks=[0]))
    x, t, y, mask, _ = random_inputs(model.cfg, height=18, width=16)  # a 9 x 8 token grid
    with pytest.raises(KVCompressionError, match="stride 2.*9x8 tokens"):
        model(x, t, y, mask)


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline against diffusers.PixArtSigmaPipeline


@pytest.fixture(scope="module")
def sigma_folder(tmp_path_factory):
    """A PixArtSigmaPipeline folder: tiny Sigma transformer (no null caption, as the released folders), tiny T5,
    tiny VAE with the SDXL VAE's scaling factor, DPM-Solver++."""
    cfg = sigma_config()
    sd = {k: v for k, v in random_model(cfg, std=0.05).state_dict().items() if "y_embedding" not in k}
    return write_random_pipeline(tmp_path_factory.mktemp("sigma"), sd, cfg, vae=SDXL_VAE)


def sigma_run_config(path, *overrides):
    return load_config(Config, "pixart_sigma_1024", [
        f"sample.checkpoint={path}", f"text_encoder.path={path}", f"autoencoder.path={path}",
        "text_encoder.dtype=fp32", "text_encoder.clean_captions=false", "sample.uncond=negative",
        "sample.batch_size=2", "sample.resolution_binning=false", "sample.width=64", "sample.height=48",
        "sample.seed=3", "sample.steps=4", *overrides])


TINY_ARCH = ("model.arch=T", "model.depth=2", "model.hidden_size=48", "model.num_heads=4", "model.caption_channels=32")


@pytest.mark.parametrize("source", ["diffusers-folder", "official-pth"])
def test_sigma_pipeline_matches_diffusers(sigma_folder, tmp_path, source):
    """sample.py's path (plan, encode, sample, decode) on the folder itself, and on its transformer as an official
    .pth without a config (the run config's Sigma preset, at the tiny size, describes it), equals the folder run by
    diffusers.PixArtSigmaPipeline."""
    cfg = sigma_run_config(sigma_folder)
    if source == "official-pth":
        sd = read_checkpoint(sigma_folder).state_dict
        torch.save({"state_dict": sd}, tmp_path / "PixArt-Sigma-tiny.pth")
        cfg = sigma_run_config(sigma_folder, f"sample.checkpoint={tmp_path / 'PixArt-Sigma-tiny.pth'}", *TINY_ARCH)
    assert cfg.text_encoder.max_tokens == 300  # from the variant
    request = plan(cfg, PROMPTS)
    assert request.model_cfg.variant == "sigma-1024-ms" and request.model_cfg.caption_tokens == 300
    vae = load_autoencoder(cfg.autoencoder)
    assert vae.scale == pytest.approx(0.13025)  # read from the VAE's config
    features = encode_prompts(load_text_encoder(cfg.text_encoder), cfg.sample, request.prompts, 32)
    assert features.features.shape[1] == 300
    ours = sample_images(load_denoiser(cfg, request), vae, cfg.diffusion.build(), cfg.sample, request, features,
                         Timings(), progress=False)
    pipe = PixArtSigmaPipeline.from_pretrained(sigma_folder)
    latents = initial_noise(request.seeds, (4, 6, 8), "cpu", torch.float32)
    theirs = pipe(PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=48, width=64,
                  latents=latents, output_type="pt", clean_caption=False, use_resolution_binning=False,
                  max_sequence_length=300).images
    assert theirs.shape == ours.shape == (2, 3, 48, 64)
    assert (ours - theirs).abs().max().item() < TOL


def test_sample_py_runs_a_sigma_pipeline_folder(sigma_folder, tmp_path):
    main = load_script("sample/sample.py").main
    argv = ["--config", "pixart_sigma_1024", "--pipeline", str(sigma_folder), "--prompt", PROMPTS[0],
            "--negative-prompt", "", "--steps", "2", "--width", "64", "--height", "48", "--out", str(tmp_path),
            "--no-progress", "--set", "text_encoder.dtype=fp32", "--set", "sample.resolution_binning=false"]
    assert main(argv) == 0
    assert len(list(tmp_path.rglob("*.png"))) >= 1


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_a_sigma_checkpoint_with_an_alpha_preset_names_the_sigma_presets(tmp_path, sigma_folder):
    cfg = load_config(Config, "pixart_alpha_1024", [f"sample.checkpoint={sigma_folder}",
                                                    f"text_encoder.path={sigma_folder}",
                                                    f"autoencoder.path={sigma_folder}"])
    with pytest.raises(CheckpointError, match="PixArt-Sigma checkpoint.*--config pixart_sigma_1024"):
        plan(cfg, PROMPTS)
    # an official .pth without a config beside it: read off its (memory-mapped) weights
    sd = random_model(sigma_config()).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "sigma.pth")
    cfg.sample.checkpoint = str(tmp_path / "sigma.pth")
    with pytest.raises(CheckpointError, match="PixArt-Sigma checkpoint.*pixart_sigma_512, pixart_sigma_1024 or "
                                              "pixart_sigma_2k"):
        plan(cfg, PROMPTS)


def test_an_alpha_checkpoint_with_a_sigma_preset_names_the_alpha_preset(tmp_path, sigma_folder):
    alpha = tiny_config(caption_channels=32, caption_tokens=120, latent_size=128, pe_interpolation=2.0,
                        micro_conditions=True)
    sd = random_model(alpha).state_dict()
    save_checkpoint(sd, alpha, tmp_path / "alpha.pth", "official")
    (tmp_path / "alpha.yaml").unlink()  # as the official file: no config beside it; its pos_embed shows the grid
    cfg = sigma_run_config(sigma_folder, f"sample.checkpoint={tmp_path / 'alpha.pth'}")
    with pytest.raises(CheckpointError, match="PixArt-alpha checkpoint.*--config pixart_xl2_1024_ms"):
        plan(cfg, PROMPTS)
    with pytest.raises(CheckpointError, match="PixArt-alpha checkpoint.*pixart_xl2_1024_ms"):
        load_checkpoint(tmp_path / "alpha.pth", cfg.model)


def test_caption_length_disagreement_is_refused_before_t5_loads(sigma_folder, monkeypatch):
    import pipeline.generate as generate

    monkeypatch.setattr(generate, "load_text_encoder", lambda *a, **k: pytest.fail("T5 loaded"))
    cfg = sigma_run_config(sigma_folder, "text_encoder.max_tokens=120")
    with pytest.raises(UserError, match="max_tokens=120.*300-token captions.*max_tokens=300"):
        generate.generate(cfg, generate.plan(cfg, PROMPTS))


def test_a_sigma_model_with_the_sd_vae_is_refused_naming_the_sdxl_vae(sigma_folder, tiny_vae_path):
    cfg = sigma_run_config(sigma_folder, f"autoencoder.path={tiny_vae_path}")  # scaling factor 0.18215: the SD VAE
    with pytest.raises(UserError, match="trained on the SDXL VAE \\(scaling factor 0.13025\\).*has scaling factor "
                                        "0.18215"):
        plan(cfg, PROMPTS)


def test_kv_compression_stride_and_grid_in_the_plan(tmp_path, sigma_folder):
    cfg = sigma_config(kv_compress_blocks=[1])
    save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "kv.safetensors", "safetensors")
    run = sigma_run_config(sigma_folder, f"sample.checkpoint={tmp_path / 'kv.safetensors'}", "sample.width=48",
                           "sample.height=48")
    with pytest.raises(UserError, match="not a multiple of 32.*KV-compression stride 2"):
        plan(run, PROMPTS)


def test_a_2k_request_on_a_512_model_names_the_2k_preset(sigma_folder):
    """With resolution binning a 2048 px request would be drawn at 512 px and stretched 4x: refused."""
    run = load_config(Config, "pixart_sigma_512", [
        f"sample.checkpoint={tmp_checkpoint_512(sigma_folder)}", f"text_encoder.path={sigma_folder}",
        f"autoencoder.path={sigma_folder}", "sample.width=2048", "sample.height=2048"])
    with pytest.raises(UserError, match="2048x2048 px is beyond the PixArt-Sigma 512 model.*--config pixart_sigma_2k"):
        plan(run, PROMPTS)
    run.sample.width = run.sample.height = 1024  # twice the trained side: allowed
    assert plan(run, PROMPTS).model_cfg.variant == "sigma-512"


def tmp_checkpoint_512(folder):
    """A tiny Sigma-512-like model (latent side 64, scale 1) beside the pipeline folder."""
    cfg = sigma_config(latent_size=64, pe_interpolation=1.0)
    path = folder.parent / "sigma512.safetensors"
    if not path.exists():
        save_checkpoint(random_model(cfg).state_dict(), cfg, path, "safetensors")
    return path


def test_sigma_variant_config_errors():
    with pytest.raises(ConfigError, match="model.variant must be one of alpha-256, .*sigma-2k, got 'sigma-4k'"):
        load_config(Config, "pixart_sigma_2k", ["model.variant=sigma-4k"])
    with pytest.raises(ConfigError, match=r"kv_compress_blocks \[30\].*0\.\.27"):
        load_config(Config, "pixart_sigma_2k", ["model.kv_compress_blocks=[30]"])


# ----------------------------------------------------------------------------------------------------------
# The trainers and the int8 path on a tiny Sigma model (300-token captions, KV compression on block 0)


class SigmaToyLatents(ToyLatents):
    """The toy training set with 300-token captions (PixArt-Sigma's length), the first 8 real."""

    def __init__(self, n: int = 16, seed: int = 0):
        super().__init__(n, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.y = torch.randn(n, 300, 32, generator=gen)
        self.mask = torch.zeros(n, 300, dtype=torch.long)
        self.mask[:, :8] = 1


def sigma_toy_data(cfg):
    return SigmaToyLatents(), SigmaToyLatents.collate, BucketBatchSampler


SIGMA_TOY = ("model.caption_tokens=300", "model.kv_compress_blocks=[0]")


@pytest.fixture(scope="module")
def sigma_teacher(tmp_path_factory):
    cfg = tiny_config(caption_channels=32, caption_tokens=300, latent_size=8, kv_compress_blocks=[0])
    path = tmp_path_factory.mktemp("sigma_teacher") / "teacher.safetensors"
    save_checkpoint(random_model(cfg, seed=3, std=0.05).state_dict(), cfg, path, "safetensors")
    return path


def assert_resume_exact(make_config, task, steps=4):
    """A run of `steps` steps equals one stopped halfway and resumed, bit for bit up to 1e-6."""
    straight = train(make_config("a", f"train.steps={steps}"), task, sigma_toy_data)
    half = train(make_config("b", f"train.steps={steps // 2}"), task, sigma_toy_data)
    resumed = train(make_config("b", f"train.steps={steps}"), task, sigma_toy_data, resume=str(half))
    a, b = (last_state(r) for r in (straight, resumed))
    assert a["step"] == b["step"] == steps
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    return a


@pytest.mark.parametrize("lora", [0, 4], ids=["lcd", "lcm-lora"])
def test_lcd_and_lcm_lora_on_sigma_resume_exactly(sigma_teacher, tmp_path, lora):
    def make(name, *extra):
        return toy_config(tmp_path / name, *SIGMA_TOY, f"distill.teacher={sigma_teacher}", "train.ema_decay=0",
                          f"distill.lora_rank={lora}", "train.checkpoint_every=2", *extra)

    state = assert_resume_exact(make, LCMTask)
    assert any("attn.sr" in k for k in state["model"]) or lora  # the compression trains with the student


def test_controlnet_transformer_on_sigma_resumes_exactly(sigma_teacher, tmp_path):
    def make(name, *extra):
        return toy_config(tmp_path / name, *SIGMA_TOY, f"control.base={sigma_teacher}", "control.num_blocks=1",
                          "train.ema_decay=0.9", "train.checkpoint_every=2", *extra)

    state = assert_resume_exact(make, ControlNetTask)
    assert "branch.controlnet.0.copied_block.attn.sr.weight" in state["model"]  # the copy compresses as its base


def test_int8_path_quantises_a_kv_compressed_sigma_model():
    pytest.importorskip("torchao")
    from models.quantize import block_linears, quantize_transformer

    cfg = sigma_config(latent_size=32, hidden_size=64, kv_compress_blocks=[0])
    model = random_model(cfg, std=0.05)
    x, t, y, mask, _ = random_inputs(cfg, height=16, width=16)
    with torch.no_grad():
        ref = model(x, t, y, mask)
        quantized = quantize_transformer(copy.deepcopy(model), "int8")
        out = quantized(x, t, y, mask)
    assert len(block_linears(quantized)) == 2 * 7  # attn qkv, proj; cross_attn q, kv, proj; mlp fc1, fc2
    assert isinstance(quantized.blocks[0].attn.sr, torch.nn.Conv2d)  # the compression's conv stays float
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.slow
def test_gpu_checks_run_the_sigma_kv_benchmark_at_toy_size(tmp_path):
    """tools/gpu_checks.py's sigma-kv check (the 2K KV-compression speed-up on a GPU), at toy size on the CPU."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "tools/gpu_checks.py", "--smoke", "--out", str(tmp_path), "--only",
                           "sigma-kv", "--budget-s", "200"], cwd=root, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    check = {c["name"]: c for c in report["checks"]}["sigma-kv"]
    assert check["exit_code"] == 0 and check["rows"], done.stdout[-2000:]
    assert "sigma-512" in (tmp_path / "gpu_checks.md").read_text()


def test_the_demo_draws_with_a_sigma_pipeline_folder(sigma_folder):
    from tools.demo import Engine

    engine = Engine(sigma_run_config(sigma_folder), "PixArt-Sigma")
    assert engine.model_cfg.variant == "sigma-1024-ms"
    image, control = engine.draw(PROMPTS[0], seed=1, width=64, height=48, control=None, control_scale=1.0, steps=2)
    assert image.shape == (3, 48, 64) and control is None and torch.isfinite(image).all()

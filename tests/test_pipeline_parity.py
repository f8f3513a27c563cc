"""The whole text-to-image pipeline against diffusers.PixArtAlphaPipeline on one random-weight pipeline folder."""

import pytest
import torch
from conftest import random_model, tiny_config
from diffusers import PixArtAlphaPipeline

from configs import Config, load_config
from models.autoencoder import load_autoencoder
from models.checkpoint import save_checkpoint
from models.text_encoder import load_text_encoder
from pipeline.generate import Timings, encode_prompts, initial_noise, load_denoiser, plan, sample_images
from tools.convert_checkpoint import main as convert
from tools.random_weights import write_random_pipeline

PROMPTS = ["a large red circle at the top left", "two small blue squares"]


@pytest.fixture(scope="module", params=["dpm", "lcm"])
def folder(request, tmp_path_factory):
    # sample_size 128: diffusers' pipeline passes micro-conditions only for the 1024 model's latent size
    cfg = tiny_config(caption_channels=32, caption_tokens=120, latent_size=128, pe_interpolation=2.0,
                      micro_conditions=True)
    sd = random_model(cfg, std=0.05).state_dict()
    sd = {k: v for k, v in sd.items() if "y_embedding" not in k}  # as a real diffusers folder: no null caption
    return request.param, write_random_pipeline(tmp_path_factory.mktemp(request.param), sd, cfg,
                                                scheduler=request.param)


def ours(path, sampler, steps, guidance):
    cfg = load_config(Config, "pixart_alpha_1024", [
        f"sample.checkpoint={path}", f"text_encoder.path={path}", f"autoencoder.path={path}",
        "text_encoder.dtype=fp32", "text_encoder.clean_captions=false", f"sample.sampler={sampler}",
        f"sample.steps={steps}", f"sample.guidance={guidance}", "sample.uncond=negative", "sample.batch_size=2",
        "sample.resolution_binning=false", "sample.width=64", "sample.height=48", "sample.seed=3"])
    request = plan(cfg, PROMPTS)
    features = encode_prompts(load_text_encoder(cfg.text_encoder), cfg.sample, request.prompts, 32)
    images = sample_images(load_denoiser(cfg, request), load_autoencoder(cfg.autoencoder), cfg.diffusion.build(),
                           cfg.sample, request, features, Timings(), progress=False)
    return images, request


def test_images_match_diffusers_pipeline(folder):
    sampler, path = folder
    steps, guidance = (4, 4.5) if sampler == "dpm" else (4, 0.0)  # PixArt-delta: LCM in 4 steps, no CFG
    assert_matches_diffusers(path, sampler, steps, guidance)


def test_an_exported_student_converts_to_a_pipeline_diffusers_samples_in_4_lcm_steps(tmp_path, tiny_t5_path,
                                                                                     tiny_vae_path):
    """A student as the LCD trainer exports it (this project's safetensors) -> tools/convert_checkpoint.py --to
    pipeline --scheduler lcm -> diffusers.PixArtAlphaPipeline in 4 steps gives sample.py's LCM images."""
    cfg = tiny_config(caption_channels=32, caption_tokens=120, latent_size=128, pe_interpolation=2.0,
                      micro_conditions=True)
    save_checkpoint(random_model(cfg, seed=7, std=0.05).state_dict(), cfg, tmp_path / "student.safetensors",
                    "safetensors")
    assert convert([str(tmp_path / "student.safetensors"), str(tmp_path / "pipe"), "--to", "pipeline", "--scheduler",
                    "lcm", "--text-encoder", str(tiny_t5_path), "--vae", str(tiny_vae_path)]) == 0
    assert assert_matches_diffusers(tmp_path / "pipe", "lcm", 4, 0.0)


def assert_matches_diffusers(path, sampler, steps, guidance) -> bool:
    images, request = ours(path, sampler, steps, guidance)
    pipe = PixArtAlphaPipeline.from_pretrained(path)
    latents = initial_noise(request.seeds, (4, 6, 8), "cpu", torch.float32)  # the noise our seeds give
    generator = [torch.Generator().manual_seed(seed + 1_000_003) for seed in request.seeds]  # ours, per image
    theirs = pipe(PROMPTS, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance, height=48,
                  width=64, latents=latents, generator=generator, output_type="pt", clean_caption=False,
                  use_resolution_binning=False, max_sequence_length=120).images
    assert theirs.shape == images.shape == (2, 3, 48, 64)
    assert (images - theirs).abs().max().item() < 1e-4
    return True

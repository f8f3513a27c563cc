"""The T5 caption encoder and the autoencoders, on tiny real transformers / diffusers folders written offline."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, T5EncoderModel

from models.autoencoder import (
    SDVAE,
    AutoencoderConfig,
    AutoencoderError,
    PixelSpace,
    latent_channels_of,
    load_autoencoder,
)
from models.text_encoder import TextEncoderConfig, TextEncoderError, clean_caption, load_text_encoder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two golden stars beside a small blue square on a dark background"]


def t5_config(path, **overrides) -> TextEncoderConfig:
    return TextEncoderConfig(**{"path": str(path), "dtype": "fp32", **overrides})


# ----------------------------------------------------------------------------------------------------------
# Text encoder


def test_encode_shapes_and_mask(tiny_t5_path):
    encoder = load_text_encoder(t5_config(tiny_t5_path))
    features, mask = encoder.encode(PROMPTS)
    assert features.shape == (2, 120, 32) and features.dtype == torch.float32 and encoder.feature_dim == 32
    assert mask.shape == (2, 120) and mask.dtype == torch.long
    lengths = [len(ids) for ids in encoder.tokenizer([clean_caption(p) for p in PROMPTS]).input_ids]
    assert mask.sum(1).tolist() == lengths  # caption tokens + </s>
    for row, n in zip(mask, lengths):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()  # padding is masked


def test_features_equal_direct_t5_call(tiny_t5_path):
    encoder = load_text_encoder(t5_config(tiny_t5_path, clean_captions=False))
    features, mask = encoder.encode(PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_path, local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(tiny_t5_path, local_files_only=True).eval()
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.equal(mask, tokens.attention_mask) and torch.equal(features, expected)


def test_bf16_features(tiny_t5_path):
    features, _ = load_text_encoder(t5_config(tiny_t5_path, dtype="bf16")).encode(PROMPTS[:1])
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()


def test_truncation_warns_with_counts(tiny_t5_path, caplog):
    encoder = load_text_encoder(t5_config(tiny_t5_path, max_tokens=8))
    long_prompt = "a red circle next to a green triangle under a golden star"
    total = len(encoder.tokenizer(clean_caption(long_prompt)).input_ids)
    assert total > 8
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        features, mask = encoder.encode([long_prompt, "a cube"])
    assert f"dropped {total - 8} of {total} tokens" in caplog.text
    assert caplog.text.count("dropped") == 1  # the short prompt is not reported
    assert features.shape == (2, 8, 32) and mask[0].eq(1).all()


def test_missing_text_encoder_names_path_and_download(tmp_path):
    missing = tmp_path / "no-t5-here"
    with pytest.raises(TextEncoderError, match="no-t5-here") as err:
        load_text_encoder(t5_config(missing))
    assert "hf download" in str(err.value) and "text_encoder/*" in str(err.value)
    with pytest.raises(TextEncoderError, match="not a hub id in the local Hugging Face cache"):
        load_text_encoder(t5_config("nobody-xyz/not-a-cached-model"))
    with pytest.raises(TextEncoderError, match="neither config.json"):
        load_text_encoder(t5_config(tmp_path))  # a folder, but not a T5 one


def test_pipeline_root_layout(tiny_t5_path, tmp_path):
    for sub, names in (("text_encoder", ("config.json", "model.safetensors")),
                       ("tokenizer", ("tokenizer.json", "tokenizer_config.json"))):
        (tmp_path / sub).mkdir()
        for name in names:
            shutil.copy(tiny_t5_path / name, tmp_path / sub / name)
    features, _ = load_text_encoder(t5_config(tmp_path)).encode(PROMPTS)
    expected, _ = load_text_encoder(t5_config(tiny_t5_path)).encode(PROMPTS)
    assert torch.equal(features, expected)


def test_cached_hub_id(tiny_t5_path, tiny_vae_path, tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the local Hugging Face cache, without any network."""
    repo = tmp_path / "models--someone--tiny-pipeline"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_t5_path, snapshot / "text_encoder")
    shutil.copytree(tiny_t5_path, snapshot / "tokenizer")
    shutil.copytree(tiny_vae_path, snapshot / "vae")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_text_encoder(t5_config("someone/tiny-pipeline")).encode(PROMPTS)[0].shape == (2, 120, 32)
    assert latent_channels_of(AutoencoderConfig(path="someone/tiny-pipeline")) == 4


def test_cache_hits_misses_and_identity(tiny_t5_path, tmp_path, monkeypatch):
    cfg = t5_config(tiny_t5_path, cache_dir=str(tmp_path / "cache"))
    encoder = load_text_encoder(cfg)
    features, mask = encoder.encode(PROMPTS)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave no temporaries

    batches = []
    forward = encoder.model.forward
    monkeypatch.setattr(encoder.model, "forward", lambda **kw: batches.append(kw["input_ids"].shape) or forward(**kw))
    again, again_mask = encoder.encode(PROMPTS)
    assert batches == [] and torch.equal(again, features) and torch.equal(again_mask, mask)  # all hits
    mixed, _ = encoder.encode(["a pink heart", PROMPTS[1]])
    assert batches == [(1, 120)] and torch.equal(mixed[1], features[1])  # only the miss is encoded

    encoder.unload()  # cached prompts still encode without the model
    assert encoder.model is None and torch.equal(encoder.encode(PROMPTS[:1])[0], features[:1])
    with pytest.raises(RuntimeError, match="unloaded"):
        encoder.encode(["a prompt never seen"])

    other = load_text_encoder(t5_config(tiny_t5_path, cache_dir=cfg.cache_dir, max_tokens=16))
    monkeypatch.setattr(other.model, "forward", lambda **kw: (_ for _ in ()).throw(AssertionError("encoded")))
    with pytest.raises(AssertionError, match="encoded"):
        other.encode(PROMPTS[:1])  # another encoder identity misses the cache


def test_int8_encoder_has_int8_weights_and_matches_fake_quantised_fp32(tiny_t5_path):
    """Weight-only int8 (torchao): every Linear holds int8 values with one scale per row (max|w| / 127.5, w * (1 /
    scale) rounded); the features equal fp32 T5 with those weights quantised and dequantised here."""
    float_encoder = load_text_encoder(t5_config(tiny_t5_path))
    reference, mask = float_encoder.encode(PROMPTS)
    with torch.no_grad():
        for m in float_encoder.model.modules():
            if type(m) is torch.nn.Linear:
                scale = m.weight.abs().amax(-1, keepdim=True) / 127.5
                m.weight.copy_((m.weight * (1.0 / scale)).round().clamp(-128, 127) * scale)
    fake_quantised, _ = float_encoder.encode(PROMPTS)
    encoder = load_text_encoder(t5_config(tiny_t5_path, load_in_8bit=True))
    linears = [m for m in encoder.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * (4 + 3)  # q, k, v, o and wi_0, wi_1, wo in each of the 2 layers
    assert all(m.weight.qdata.dtype == torch.int8 for m in linears)
    features, mask8 = encoder.encode(PROMPTS)
    assert features.dtype == torch.float32 and torch.equal(mask, mask8)
    assert (features - fake_quantised).abs().max() < 1e-4 * fake_quantised.abs().max()
    assert (features - reference).abs().max() > 1e-5  # quantised for real
    cos = torch.nn.functional.cosine_similarity(features, reference, dim=-1)[mask.bool()]  # (valid tokens,)
    assert cos.min() > 0.99


@pytest.mark.parametrize("raw, clean", [
    ("A Red Circle", "a red circle"),
    ("see https://example.com/a?b=1 and www.foo.org/x now", "see and now"),
    ("<p>a <b>blue</b> square</p>", "a blue square"),
    ("photo by @some_user of a cat", "photo by of a cat"),
    ("cats &amp; dogs &quot;together&quot;", 'cats & dogs "together'),
    ("wow!!!   so   bright...", "wow! so bright."),
    ("  -- a star , on the sky ;  ", "a star, on the sky"),
    ("a <person> holding a ring", "a person holding a ring"),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_unknown_dtype(tiny_t5_path):
    with pytest.raises(ValueError, match="text_encoder.dtype 'fp8'.*fp32, bf16, fp16"):
        load_text_encoder(t5_config(tiny_t5_path, dtype="fp8"))


# ----------------------------------------------------------------------------------------------------------
# Autoencoders


def test_sd_vae_round_trip_and_scale(tiny_vae_path):
    vae = load_autoencoder(AutoencoderConfig(path=str(tiny_vae_path)))
    assert isinstance(vae, SDVAE) and vae.latent_channels == 4 and vae.downsample == 8 and vae.scale == 0.18215
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(images, sample=False)
    assert latents.shape == (2, 4, 8, 8) and vae.decode(latents).shape == (2, 3, 64, 64)

    direct = AutoencoderKL.from_pretrained(tiny_vae_path, local_files_only=True).eval()
    with torch.no_grad():
        posterior = direct.encode(images).latent_dist
        torch.testing.assert_close(latents, posterior.mode() * 0.18215)
        sampled = vae.encode(images, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sampled, posterior.sample(torch.Generator().manual_seed(1)) * 0.18215)
        torch.testing.assert_close(vae.decode(latents), direct.decode(latents / 0.18215).sample)


def test_scale_override_and_pipeline_root(tiny_vae_path, tmp_path):
    shutil.copytree(tiny_vae_path, tmp_path / "vae")
    vae = load_autoencoder(AutoencoderConfig(path=str(tmp_path), scale=0.5))
    reference = load_autoencoder(AutoencoderConfig(path=str(tiny_vae_path)))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(vae.encode(images, sample=False),
                               reference.encode(images, sample=False) / 0.18215 * 0.5)


def test_pixel_space_is_identity():
    ae = load_autoencoder(AutoencoderConfig(kind="pixel", path="ignored"))
    assert isinstance(ae, PixelSpace) and (ae.latent_channels, ae.downsample, ae.scale) == (3, 1, 1.0)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(ae.decode(ae.encode(images)), images)


def test_autoencoder_errors(tmp_path, tiny_t5_path):
    with pytest.raises(AutoencoderError, match="(?s)no-vae-here.*hf download"):
        load_autoencoder(AutoencoderConfig(path=str(tmp_path / "no-vae-here")))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(AutoencoderError, match="'UNet2DConditionModel', not an AutoencoderKL"):
        load_autoencoder(AutoencoderConfig(path=str(tmp_path / "unet")))
    with pytest.raises(AutoencoderError, match="not an AutoencoderKL"):
        latent_channels_of(AutoencoderConfig(path=str(tiny_t5_path)))  # a T5 folder is no VAE
    with pytest.raises(AutoencoderError, match="kind 'vqgan'; valid: sd-vae, pixel"):
        load_autoencoder(AutoencoderConfig(kind="vqgan"))


def test_latent_channels_of(tiny_vae_path, monkeypatch):
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", None)  # reading config.json must be enough
    assert latent_channels_of(AutoencoderConfig(path=str(tiny_vae_path))) == 4
    assert latent_channels_of(AutoencoderConfig(kind="pixel")) == 3


def test_unknown_words_and_characters_warn_in_one_short_line(caplog):
    """Emoji became <unk> without a word; 5,000 unknown words printed one 75 KB line."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    encoder = load_text_encoder(TextEncoderConfig(path=str(root / "weights/shapes/t5"), max_tokens=32, dtype="fp32"))
    with caplog.at_level(logging.WARNING):
        encoder.encode(["a large red circle at the center \N{CAT FACE}"])
    assert "never saw in training: \N{CAT FACE}" in caplog.text
    caplog.clear()
    words = [f"zq{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(5000)]
    with caplog.at_level(logging.WARNING):
        encoder.encode([" ".join(words)])
    assert "and 4980 more" in caplog.text
    assert all(len(r.getMessage()) < 1000 for r in caplog.records), [len(r.getMessage()) for r in caplog.records]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder.encode(["a large red circle at the center"])
    assert not caplog.records


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_the_t5_encoder_and_tokenizer_equal_transformers(tmp_path, tiny_t5_path, feed_forward):
    """models/t5.py (no transformers import at start-up) against transformers' T5EncoderModel and tokenizer on the
    same folder: token ids and masks equal, features to 1e-5; T5 v1.1 (gated-gelu) and the original T5 (relu)."""
    from transformers import T5Config

    from models.t5 import T5Tokenizer, load_t5_encoder

    folder = tiny_t5_path
    if feed_forward == "relu":  # the tiny folder's tokenizer with random weights of the original T5's layout
        folder = tmp_path / "relu"
        shutil.copytree(tiny_t5_path, folder)
        config = T5Config.from_pretrained(folder)
        config.feed_forward_proj, config.dense_act_fn, config.is_gated_act = "relu", "relu", False
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(folder)
    prompts = ["a large red circle at the center", "two cats \N{CAT FACE} on the moon, 12 naive!", "x " * 200, ""]
    theirs_tok, ours_tok = AutoTokenizer.from_pretrained(folder), T5Tokenizer(folder / "tokenizer.json")
    assert theirs_tok(prompts).input_ids == ours_tok(prompts).input_ids
    assert theirs_tok.tokenize(prompts[1]) == ours_tok.tokenize(prompts[1])
    theirs = theirs_tok(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    ours = ours_tok(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(theirs.input_ids, ours.input_ids) and torch.equal(theirs.attention_mask, ours.attention_mask)
    reference = T5EncoderModel.from_pretrained(folder).eval()
    model = load_t5_encoder(folder, torch.float32)
    with torch.no_grad():
        want = reference(input_ids=ours.input_ids, attention_mask=ours.attention_mask).last_hidden_state
        got = model(input_ids=ours.input_ids, attention_mask=ours.attention_mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("what", ["t5", "vae"])
def test_random_weights_cli_prints_only_the_folder(tmp_path, what):
    """Library notices (torchao's pytree deprecation, a shard progress bar) are not the user's business."""
    out = tmp_path / what
    result = subprocess.run([sys.executable, str(ROOT / "tools/random_weights.py"), what, str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert result.stderr == ""

"""Config system: presets, inheritance, --set overrides, and the errors for unknown keys and wrong types."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from configs import Config, ConfigError, load_config, save_config, to_dict
from configs.loader import PRESET_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,latent,interp,micro", [
    ("pixart_xl2_256", 32, 0.5, False), ("pixart_xl2_512", 64, 1.0, False), ("pixart_xl2_1024_ms", 128, 2.0, True),
])
def test_presets_resolve_through_inheritance(name, latent, interp, micro):
    cfg = load_config(Config, name)
    m = cfg.model
    assert (m.arch, m.latent_size, m.pe_interpolation, m.micro_conditions) == ("XL", latent, interp, micro)
    assert m.dims() == (28, 1152, 16)


def test_every_preset_file_loads():
    for path in PRESET_DIR.glob("*.yaml"):
        load_config(Config, path)


def test_overrides_are_typed_and_win_over_files(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {PRESET_DIR / 'pixart_xl2_512.yaml'}\nmodel:\n  depth: 6\n")
    sets = ["model.hidden_size=384", "model.pe_interpolation=2", "model.micro_conditions=true"]
    cfg = load_config(Config, child, sets)
    m = cfg.model
    assert (m.depth, m.hidden_size, m.latent_size) == (6, 384, 64)
    assert m.pe_interpolation == 2.0 and isinstance(m.pe_interpolation, float) and m.micro_conditions is True
    assert load_config(Config, child, ["model.depth=null"]).model.depth is None
    assert load_config(Config, child, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_one_entry_of_a_mapping_is_set_by_a_dotted_key():
    cfg = load_config(Config, "lcm_shapes", ["sample.sampler_options.timesteps=[999, 759, 499, 119]",
                                             "sample.sampler_options.original_steps=50"])
    assert cfg.sample.sampler_options == {"timesteps": [999, 759, 499, 119], "original_steps": 50}
    whole = load_config(Config, "lcm_shapes", ["sample.sampler_options={timesteps: [999, 119]}",
                                               "sample.sampler_options.original_steps=25"])
    assert whole.sample.sampler_options == {"timesteps": [999, 119], "original_steps": 25}  # added to, not replaced
    with pytest.raises(ConfigError, match="sample.sampler_options is a mapping of values; set one entry with "
                                          "sample.sampler_options.KEY=VALUE"):
        load_config(Config, "lcm_shapes", ["sample.sampler_options.a.b=1"])


def test_a_dmd_generator_at_given_timesteps_is_sampled_at_them_unless_the_sample_section_says_otherwise():
    ts = "dmd.generator_timesteps=[999, 759, 499, 119]"
    assert load_config(Config, "dmd_shapes_4step", [ts]).sample.sampler_options == {"timesteps": [999, 759, 499, 119]}
    assert load_config(Config, "dmd_shapes_4step", [ts, "sample.steps=2"]).sample.sampler_options == {}
    assert load_config(Config, "dmd_shapes_4step", [ts, "sample.sampler=dpm"]).sample.sampler_options == {}
    given = load_config(Config, "dmd_shapes_4step", [ts, "sample.sampler_options.timesteps=[999, 639, 339, 119]"])
    assert given.sample.sampler_options == {"timesteps": [999, 639, 339, 119]}  # refused when a run is checked
    assert load_config(Config, "dmd_shapes_4step").sample.sampler_options == {"timesteps": [999, 639, 339, 119]}
    assert load_config(Config, "dmd_shapes_2step").sample.sampler_options == {}  # LCM's own picks


@pytest.mark.parametrize("override,message", [
    ("model.dpth=3", "unknown config key 'model.dpth'; did you mean 'model.depth'?"),
    ("modle.depth=3", "unknown config key 'modle'; did you mean 'model'?"),
    ("model.depth=abc", "model.depth: expected int, got 'abc' (str)"),
    ("model.depth=2.5", "model.depth: expected int, got 2.5 (float)"),
    ("model.micro_conditions=3", "model.micro_conditions: expected bool, got 3 (int)"),
    ("model.depth.x=3", "model.depth is a value, not a section"),
    ("model.depth", "expected KEY=VALUE"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(Config, "pixart_xl2_512", [override])
    assert message in str(info.value)


def test_bad_files_are_named(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  pe_interpolaton: 1.0\n")
    with pytest.raises(ConfigError, match="'model.pe_interpolaton'; did you mean 'model.pe_interpolation'"):
        load_config(Config, typo)
    with pytest.raises(ConfigError, match="did you mean pixart_xl2_512"):
        load_config(Config, "pixart_xl2_521")
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\n")
    loop_b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(Config, loop_a)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Config, broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping of PixArtConfig fields"):
        load_config(Config, scalar)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Config, "pixart_xl2_1024_ms", ["model.depth=4"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Config, path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


def test_print_config_from_the_command_line():
    out = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "a", "b", "--to", "official",
                          "--config", "pixart_xl2_1024_ms", "--set", "model.depth=7", "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    printed = yaml.safe_load(out)
    assert printed["model"]["depth"] == 7 and printed["model"]["micro_conditions"] is True


def test_reading_a_yaml_imports_no_torch():
    """configs/ is the top floor (the schema of every section) over torch-free section modules: reading a preset,
    a variant's defaults and its checks included, loads no torch, diffusers or transformers."""
    code = ("import sys\n"
            "from configs import Config, load_config\n"
            "cfg = load_config(Config, 'pixart_sigma_2k', ['model.kv_compress_blocks=[14, 15]'])\n"
            "assert cfg.model.caption_tokens == cfg.text_encoder.max_tokens == 300\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_choice_fields_are_literals_checked_by_the_loader_and_validate():
    from common.choices import literal_choices

    with pytest.raises(ConfigError, match="train.mixed_precision must be one of no, bf16, fp16, got 'fp8'"):
        load_config(Config, None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="autoencoder.kind must be one of sd-vae, pixel"):
        load_config(Config, None, ["autoencoder.kind=vqgan"])
    hints = typing.get_type_hints(Config)
    for section in ("sample", "train", "diffusion", "distill", "autoencoder", "text_encoder", "control", "model"):
        cls = hints[section]
        assert hasattr(cls, "validate"), section
        assert any(literal_choices(t) for t in typing.get_type_hints(cls).values()), section

"""Config system: presets, inheritance, --set overrides, and the errors for unknown keys and wrong types."""

import subprocess
import sys
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

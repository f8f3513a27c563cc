"""tools/average_checkpoints.py: the weighted mean of checkpoints, checked against the files' raw tensors read with
safetensors itself; any format and int8-weights storage in; every bad input refused before anything is written."""

import json

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from safetensors import safe_open
from toy_training import toy_config, toy_data

from engine.loop import train
from models import quantize as Q
from models.checkpoint import load_checkpoint, save_checkpoint
from tasks.alpha import PixArtAlphaTask
from tools.average_checkpoints import main


def raw(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture()
def three(tmp_path):
    cfg = tiny_config()
    paths = []
    for seed in range(3):
        path = tmp_path / f"m{seed}.safetensors"
        save_checkpoint(random_model(cfg, seed=seed).state_dict(), cfg, path, "safetensors",
                        metadata={"step": str(100 * (seed + 1)), "config": f"run: {seed}"})
        paths.append(path)
    return cfg, paths


def test_the_average_is_the_weighted_mean_of_the_files_tensors(three, tmp_path):
    _, paths = three
    out = tmp_path / "mean.safetensors"
    assert main([str(out), *map(str, paths)]) == 0
    tensors = [raw(p) for p in paths]
    averaged = raw(out)
    assert set(averaged) == set(tensors[0])
    for key, value in averaged.items():
        np.testing.assert_allclose(value, (tensors[0][key] + tensors[1][key] + tensors[2][key]) / 3, rtol=0, atol=1e-6)
    weighted = tmp_path / "weighted.safetensors"
    assert main([str(weighted), str(paths[0]), str(paths[2]), "--weights", "3", "1"]) == 0
    for key, value in raw(weighted).items():
        np.testing.assert_allclose(value, 0.75 * tensors[0][key] + 0.25 * tensors[2][key], rtol=0, atol=1e-6)
    model, _, _ = load_checkpoint(out)  # and it loads as a model of the same architecture
    assert model.x_embedder.proj.weight.dtype == torch.float32


def test_the_average_keeps_the_first_files_metadata_and_names_its_sources(three, tmp_path, caplog):
    _, paths = three
    out = tmp_path / "mean.safetensors"
    assert main([str(out), str(paths[1]), str(paths[0])]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["config"] == "run: 1" and meta["step"] == "200"
    sources = json.loads(meta["averaged_from"])
    assert [s["path"] for s in sources] == [str(paths[1]), str(paths[0])]
    assert [s["step"] for s in sources] == ["200", "100"] and [s["weight"] for s in sources] == [0.5, 0.5]
    assert all(len(s["sha256"]) == 64 for s in sources)
    assert "comes from another run config" in caplog.text  # two runs' checkpoints: a soup, said so


def test_an_int8_weights_file_is_averaged_as_the_float_weights_it_loads_as(three, tmp_path):
    cfg, paths = three
    model, _, _ = load_checkpoint(paths[0])
    stored = save_checkpoint(Q.store_int8_weights(model.state_dict(), model), cfg, tmp_path / "q.safetensors",
                             "safetensors", metadata={"quantization": "int8-weights"})
    out = tmp_path / "mean.safetensors"
    assert main([str(out), str(stored), str(stored)]) == 0
    restored, _, _ = load_checkpoint(stored)
    averaged, _, _ = load_checkpoint(out)
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(value, restored.state_dict()[key], rtol=0, atol=1e-7)
    with safe_open(str(out), "pt") as f:
        assert "quantization" not in f.metadata()  # the mean is float


def test_training_checkpoints_give_the_mean_of_their_ema_weights(tmp_path):
    run = train(toy_config(tmp_path / "runs", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=10"),
                PixArtAlphaTask, toy_data)
    states = sorted((run / "checkpoints").glob("step_*.pt"))
    assert len(states) == 2
    out = tmp_path / "mean.safetensors"
    assert main([str(out), *map(str, states)]) == 0
    shadows = [torch.load(p, weights_only=True)["networks"]["model"]["ema"]["shadow"] for p in states]
    averaged = raw(out)
    assert set(shadows[0]) <= set(averaged)
    for key in shadows[0]:
        np.testing.assert_allclose(averaged[key], ((shadows[0][key] + shadows[1][key]) / 2).numpy(), rtol=0, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        assert [s["step"] for s in json.loads(f.metadata()["averaged_from"])] == ["2", "4"]
    carried = tmp_path / "carried.safetensors"  # the run's own export: what the task records travels with the mean
    assert main([str(carried), *map(str, states), "--metadata-from", str(run / "ema.safetensors")]) == 0
    with safe_open(str(run / "ema.safetensors"), "pt") as f:
        exported = f.metadata()
    with safe_open(str(carried), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in exported if k not in ("format", "model_config")} == \
        {k: v for k, v in exported.items() if k not in ("format", "model_config")}
    np.testing.assert_array_equal(raw(carried)["x_embedder.proj.weight"], averaged["x_embedder.proj.weight"])


@pytest.mark.parametrize("case, message", [
    ("one", "give at least two checkpoints to average"),
    ("suffix", "its name must end in .safetensors"),
    ("same", "is one of the inputs"),
    ("missing", "no such checkpoint"),
    ("weights", "--weights gives 1 weights for 2 checkpoints"),
    ("negative", "--weights must be finite, >= 0"),
    ("other", "does not fit the architecture of"),
    ("corrupt", "corrupt.safetensors"),
])
def test_bad_inputs_exit_2_and_write_nothing(three, tmp_path, caplog, case, message):
    _, paths = three
    out = tmp_path / "out.safetensors"
    a, b = str(paths[0]), str(paths[1])
    if case == "other":
        wide = tiny_config(hidden_size=64)
        b = str(save_checkpoint(random_model(wide).state_dict(), wide, tmp_path / "wide.safetensors", "safetensors"))
    if case == "corrupt":
        (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
        b = str(tmp_path / "corrupt.safetensors")
    args = {"one": [str(out), a], "suffix": [str(tmp_path / "out.pt"), a, b], "same": [a, a, b],
            "missing": [str(out), a, str(tmp_path / "nope.safetensors")], "weights": [str(out), a, b, "--weights", "1"],
            "negative": [str(out), a, b, "--weights", "1", "-1"]}.get(case, [str(out), a, b])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    assert message in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == before

"""tools/training_curve.py's bookkeeping: which weights each checkpoint exports, and that evaluations under other
settings are measured again into their own folder instead of being taken from the record (the evaluation itself is
replaced by a stand-in that reports what it was asked to evaluate)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_training import toy_config, toy_data

import tools.evaluate
from engine.loop import train
from tasks.alpha import PixArtAlphaTask
from tools.training_curve import main as training_curve


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return train(toy_config(runs, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=10"),
                 PixArtAlphaTask, toy_data)


def stand_in_evaluate(calls: list):
    """An evaluate.py `model` that scores kind as the guidance it was given and colour as the checkpoint's step."""

    def evaluate(argv):
        sets = dict(a.split("=", 1) for a in argv[argv.index("--config") + 2:] if "=" in a)
        out = Path(argv[argv.index("--out") + 1]) / "00000-eval"
        out.mkdir(parents=True)
        calls.append(sets)
        step = int(Path(sets["sample.checkpoint"]).name.split(".")[0].split("_")[1])
        single = {"kind": float(sets.get("sample.guidance", 0)), "color": float(step), "size": 1.0,
                  "position": 1.0, "count": 1.0, "all": 1.0}
        (out / "results.json").write_text(json.dumps({"groups": {"single": single}, "frechet_distance": 0.5}))
        return 0

    return evaluate


def test_each_setting_and_weight_kind_is_measured_into_its_own_record(run, monkeypatch):
    calls = []
    monkeypatch.setattr(tools.evaluate, "main", stand_in_evaluate(calls))
    assert training_curve([str(run), "--config", "shapes_teacher"]) == 0
    assert len(calls) == 2  # steps 2 and 4
    assert training_curve([str(run), "--config", "shapes_teacher"]) == 0
    assert len(calls) == 2  # both already in the record
    assert training_curve([str(run), "--config", "shapes_teacher", "--set", "sample.guidance=5"]) == 0
    assert len(calls) == 4  # another setting: measured again, not read from the first record
    record = json.loads((run / "curve-sample.guidance=5" / "curve.json").read_text())
    assert sorted(r["kind"] for r in record.values()) == [5.0, 5.0]
    assert all(r["kind"] == 0.0 for r in json.loads((run / "curve" / "curve.json").read_text()).values())

    assert training_curve([str(run), "--config", "shapes_teacher", "--weights", "model"]) == 0
    assert len(calls) == 6  # the raw weights are other weights
    ema, raw = (load_file(run / "curve" / f"step_00000004.{w}.safetensors") for w in ("ema", "model"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert {Path(c["sample.checkpoint"]).name for c in calls[-2:]} == {"step_00000002.model.safetensors",
                                                                         "step_00000004.model.safetensors"}
    md = (run / "curve" / "curve.md").read_text()  # the table of the last call shows its own weights only
    assert md.count("\n| 2 |") == 1 and md.count("\n| 4 |") == 1

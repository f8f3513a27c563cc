"""tools/compare_curves.py: curves of several runs read from their curve.json, drawn and tabulated."""

import json

import pytest
from PIL import Image

from tools.compare_curves import main


def write_curve(run, rows, folder="curve"):
    """A curve record as tools/training_curve.py writes it: key split/step/steps/weights."""
    (run / folder).mkdir(parents=True)
    record = {f"{split}/{step}/{steps}/{weights}": {"step": step, "sampler_steps": steps, "weights": weights,
                                                     "kind": kind, "fd": fd}
              for split, step, steps, weights, kind, fd in rows}
    (run / folder / "curve.json").write_text(json.dumps(record))


def test_one_line_per_run_and_only_the_chosen_split_steps_and_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_curve(a, [("validation", 400, 4, "ema", 70.0, 0.5), ("validation", 200, 4, "ema", 60.0, 0.6),
                    ("test", 200, 4, "ema", 1.0, 9.0), ("validation", 200, 1, "ema", 2.0, 8.0),
                    ("validation", 200, 4, "model", 3.0, 7.0)])
    write_curve(b, [("validation", 200, 4, "ema", 50.0, 0.7)])
    out = tmp_path / "cmp"
    assert main([str(out), f"A={a}", f"B={b}", "--steps", "4"]) == 0
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert table[2:] == ["| A | 200 | 60.0 | 0.600 |", "| A | 400 | 70.0 | 0.500 |", "| B | 200 | 50.0 | 0.700 |"]
    for measure in ("kind", "fd"):
        assert Image.open(tmp_path / f"cmp_{measure}.png").size == (720, 440)
    assert main([str(out), f"A={a}", "--steps", "4", "--weights", "model"]) == 0
    assert (tmp_path / "cmp.md").read_text().splitlines()[2:] == ["| A | 200 | 3.0 | 7.000 |"]


def test_extra_overrides_read_the_folder_training_curve_wrote_for_them(tmp_path):
    from tools.training_curve import curve_folder

    run = tmp_path / "run"
    write_curve(run, [("validation", 200, 4, "ema", 60.0, 0.6)])
    write_curve(run, [("validation", 200, 4, "ema", 80.0, 0.4)],
                folder=curve_folder(run, ["sample.guidance=5"]).name)
    out = tmp_path / "cmp"
    assert main([str(out), f"A={run}", "--steps", "4", "--set", "sample.guidance=5"]) == 0
    assert (tmp_path / "cmp.md").read_text().splitlines()[2:] == ["| A | 200 | 80.0 | 0.400 |"]


def test_a_run_without_its_curve_names_the_command(tmp_path):
    with pytest.raises(SystemExit, match="training_curve.py .* --weights ema"):
        main([str(tmp_path / "cmp"), f"A={tmp_path}"])
    old = tmp_path / "old"  # a record written before rows named their weights: none of its rows is taken
    (old / "curve").mkdir(parents=True)
    (old / "curve" / "curve.json").write_text(json.dumps({"validation/200/4": {"step": 200, "sampler_steps": 4,
                                                                               "kind": 1.0, "fd": 1.0}}))
    with pytest.raises(SystemExit, match="no validation rows of the ema weights"):
        main([str(tmp_path / "cmp"), f"A={old}", "--steps", "4"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cmp"), "no-label"])


def test_against_draws_each_measure_over_another_in_training_order(tmp_path, monkeypatch):
    import evaluation.plot

    run = tmp_path / "a"
    write_curve(run, [("validation", 200, 4, "ema", 60.0, 0.6), ("validation", 400, 4, "ema", 70.0, 0.5),
                      ("validation", 600, 4, "ema", 65.0, 0.8)])
    drawn = {}
    plot = evaluation.plot.line_plot
    monkeypatch.setattr(evaluation.plot, "line_plot", lambda series, path, *a, **k: drawn.update(
        {str(path): (series, k)}) or plot(series, path, *a, **k))
    assert main([str(tmp_path / "cmp"), f"A={run}", "--steps", "4", "--against", "fd"]) == 0
    (path, (series, kwargs)), = drawn.items()  # one figure: kind against FD (FD against itself is not drawn)
    assert path.endswith("cmp_kind_vs_fd.png") and Image.open(path).size == (720, 440)
    assert series == {"A": [(0.6, 60.0), (0.5, 70.0), (0.8, 65.0)]} and kwargs["by_x"] is False  # training order
    assert kwargs["y_from_zero"] is False  # the y axis spans the points (a trade-off plane, not a curve from 0)


def test_a_label_may_hold_an_equals_sign(tmp_path):
    run = tmp_path / "runs" / "00013"
    write_curve(run, [("validation", 200, 4, "ema", 60.0, 0.6)])
    assert main([str(tmp_path / "cmp"), f"t>=0.3T={run}", "--steps", "4"]) == 0
    assert (tmp_path / "cmp.md").read_text().splitlines()[2:] == ["| t>=0.3T | 200 | 60.0 | 0.600 |"]

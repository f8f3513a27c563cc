"""tools/compare_curves.py: curves of several runs read from their curve.json, drawn and tabulated."""

import json

import pytest
from PIL import Image

from tools.compare_curves import main


def write_curve(run, rows):
    (run / "curve").mkdir(parents=True)
    record = {f"{split}/{step}/{steps}": {"step": step, "sampler_steps": steps, "kind": kind, "fd": fd}
              for split, step, steps, kind, fd in rows}
    (run / "curve" / "curve.json").write_text(json.dumps(record))


def test_one_line_per_run_and_only_the_chosen_split_and_steps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_curve(a, [("validation", 400, 4, 70.0, 0.5), ("validation", 200, 4, 60.0, 0.6),
                    ("test", 200, 4, 1.0, 9.0), ("validation", 200, 1, 2.0, 8.0)])
    write_curve(b, [("validation", 200, 4, 50.0, 0.7)])
    out = tmp_path / "cmp"
    assert main([str(out), f"A={a}", f"B={b}", "--steps", "4"]) == 0
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert table[2:] == ["| A | 200 | 60.0 | 0.600 |", "| A | 400 | 70.0 | 0.500 |", "| B | 200 | 50.0 | 0.700 |"]
    for measure in ("kind", "fd"):
        assert Image.open(tmp_path / f"cmp_{measure}.png").size == (720, 440)


def test_a_run_without_its_curve_names_the_command(tmp_path):
    with pytest.raises(SystemExit, match="training_curve.py"):
        main([str(tmp_path / "cmp"), f"A={tmp_path}"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cmp"), "no-label"])

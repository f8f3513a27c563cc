"""Standard errors and paired comparisons of evaluations (evaluation/paired.py, tools/compare_evals.py): the
statistics against scipy and numpy, and the tool on real renders scored by the evaluator."""

import json
import re

import numpy as np
import pytest
from scipy.stats import binomtest

from evaluation.paired import binomial_stderr, compare, mcnemar_p_value, paired_difference, read_scores
from evaluation.report import evaluate_images, write_report
from tests.conftest import load_script
from tests.test_evaluation import held_out

compare_evals = load_script("tools/compare_evals.py")


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 1), (3, 3), (21, 14), (2, 17), (40, 61), (0, 12)])
def test_mcnemar_p_value_is_scipys_exact_binomial_test(only_a, only_b):
    n = only_a + only_b
    expected = 1.0 if n == 0 else binomtest(only_b, n, 0.5).pvalue
    assert mcnemar_p_value(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_paired_difference_against_the_per_item_differences():
    """The difference and its standard error are those of the mean of the items' differences in {-1, 0, 1}
    (numpy, population standard deviation / sqrt(n)); the accuracies are the plain means."""
    rng = np.random.default_rng(0)
    a = rng.random(311) < 0.79
    b = np.where(rng.random(311) < 0.15, ~a, a)  # B disagrees with A on about 15% of the items
    r = paired_difference(a.tolist(), b.tolist())
    d = b.astype(float) - a.astype(float)
    assert r["difference"] == pytest.approx(100 * d.mean(), abs=1e-9)
    assert r["stderr"] == pytest.approx(100 * d.std() / np.sqrt(len(d)), rel=1e-9)
    assert (r["a"], r["b"]) == (pytest.approx(100 * a.mean()), pytest.approx(100 * b.mean()))
    assert (r["only_a"], r["only_b"]) == (int((a & ~b).sum()), int((b & ~a).sum()))
    same = paired_difference(a.tolist(), a.tolist())
    assert same["difference"] == 0 and same["stderr"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="differ in number: 3 against 2"):
        paired_difference([True] * 3, [True] * 2)


def test_binomial_stderr_is_the_population_standard_deviation_over_sqrt_n():
    flags = np.array([1] * 247 + [0] * 64, dtype=float)
    assert binomial_stderr(247, 311) == pytest.approx(100 * flags.std() / np.sqrt(len(flags)), rel=1e-12)
    assert binomial_stderr(0, 0) == 0.0 and binomial_stderr(5, 5) == 0.0


def evaluation_folder(path, images, scenes):
    from data.synthetic import caption

    captions = [caption(objects) for objects in scenes]
    results, scores = evaluate_images(images, captions, progress=False)
    write_report(path, results, scores, images, captions)
    return results


def test_scores_file_agrees_with_the_results_and_blank_images_cost_exactly_their_objects(tmp_path):
    """scores.jsonl holds what results.json counts; blanking k single-object images of B leaves exactly those k
    images right in A alone, for every attribute."""
    scenes, images = held_out(40, 32, 32)
    results = evaluation_folder(tmp_path / "a", images, scenes)
    rows = read_scores(tmp_path / "a")
    single = [r for r in rows if len(r.objects) == 1]
    assert results["groups"]["single"]["kind"] == pytest.approx(100 * np.mean([r.objects[0]["ok"]["kind"]
                                                                               for r in single]))
    assert results["groups"]["all"]["all"] == pytest.approx(100 * np.mean([r.all_ok for r in rows]))
    assert results["groups"]["single"]["stderr"]["kind"] == binomial_stderr(
        sum(r.objects[0]["ok"]["kind"] for r in single), len(single))
    blanked = [i for i, s in enumerate(scenes) if len(s) == 1][:5]
    blank_images = [np.full_like(im, 255) if i in blanked else im for i, im in enumerate(images)]
    evaluation_folder(tmp_path / "b", blank_images, scenes)
    result = compare(rows, read_scores(tmp_path / "b"), "single")
    right_in_a = {i for i in blanked if rows[i].objects[0]["ok"]["kind"]}
    assert result["kind"]["only_a"] == len(right_in_a) and result["kind"]["only_b"] == 0
    assert result["kind"]["n"] == len(single)
    assert result["count"]["only_a"] == sum(rows[i].count_ok for i in blanked)
    multi = compare(rows, read_scores(tmp_path / "b"), "multi")
    assert multi["kind"]["only_a"] == multi["kind"]["only_b"] == 0  # the multi-object images were not touched


def test_compare_evals_cli_and_its_refusals(tmp_path, capsys, caplog):
    scenes, images = held_out(24, 32, 32)
    evaluation_folder(tmp_path / "a" / "00000-run", images, scenes)  # a numbered folder inside is found
    evaluation_folder(tmp_path / "b", images[::-1], scenes[::-1])    # other captions, image for image
    evaluation_folder(tmp_path / "c", images[:12], scenes[:12])
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "a"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| kind (n = " in out and "| +0.0 | 0.0 |" in out
    assert json.loads((tmp_path / "r.json").read_text())["kind"]["p_value"] == 1.0
    cases = [
        ((tmp_path / "a", tmp_path / "missing"), "does not exist"),
        ((tmp_path / "a", tmp_path), "holds 2 evaluations .*: name one of them"),
        ((tmp_path / "a", tmp_path / "b"), "not the same scenes"),
        ((tmp_path / "a", tmp_path / "c"), "read 24 images and .* 12: a paired comparison needs the same scenes"),
    ]
    for (a, b), text in cases:
        caplog.clear()
        assert compare_evals.main([str(a), str(b)]) == 2
        assert re.search(text, caplog.text), (text, caplog.text)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    caplog.clear()
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "old")]) == 2
    assert "has no scores.jsonl" in caplog.text and "evaluate.py folder" in caplog.text
    (tmp_path / "c" / "scores.jsonl").write_text("not json\n")
    caplog.clear()
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "line 1 is not a reading" in caplog.text

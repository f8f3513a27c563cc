"""How sure a reading is: standard errors of accuracies, and paired comparisons of two models on the same scenes.

Two evaluations of different models on the same scenes and seeds (`tools/evaluate.py model` with the same
evaluation section) read the same captions, so their difference is a paired one. Only the scenes where exactly one
of the two is right carry information about it (McNemar's test), which makes a paired difference far tighter than
two accuracies compared side by side, each with its own sampling error.

    rows = read_scores(run_dir)                               # scores.jsonl, written by every evaluation
    paired_difference([r.ok["kind"] for r in a], [r.ok["kind"] for r in b])
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

ATTRIBUTE_COLUMNS = ("kind", "color", "size", "position")  # per captioned object
IMAGE_COLUMNS = ("count", "all")                            # per image


def binomial_stderr(successes: int, n: int) -> float:
    """Standard error (in %) of an accuracy of successes / n, sqrt(p (1 - p) / n); 0 for n = 0."""
    if n <= 0:
        return 0.0
    p = successes / n
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance under 'both models are equally good' of a split of the
    discordant scenes at least as uneven as only_a : only_b (a fair-coin binomial over only_a + only_b)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n  # P(X <= k), X ~ Binomial(n, 1/2)
    return min(1.0, 2.0 * tail)


def paired_difference(a: list[bool], b: list[bool]) -> dict:
    """B's accuracy minus A's (in %) over the same items, its paired standard error and exact McNemar p-value.

    With n items, only_a of them right in A alone and only_b in B alone, the difference is (only_b - only_a) / n and
    its standard error sqrt(only_a + only_b - (only_b - only_a)^2 / n) / n (the variance of a mean of per-item
    differences in {-1, 0, 1}, with the n - 1 sample correction left out, as for the accuracies themselves).
    """
    if len(a) != len(b):
        raise ValueError(f"paired items differ in number: {len(a)} against {len(b)}")
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    if n == 0:
        return {"n": 0, "a": 0.0, "b": 0.0, "difference": 0.0, "stderr": 0.0, "only_a": 0, "only_b": 0,
                "p_value": 1.0}
    diff = (only_b - only_a) / n
    variance = max(only_a + only_b - (only_b - only_a) ** 2 / n, 0.0) / n**2
    return {"n": n, "a": 100.0 * sum(a) / n, "b": 100.0 * sum(b) / n, "difference": 100.0 * diff,
            "stderr": 100.0 * math.sqrt(variance), "only_a": only_a, "only_b": only_b,
            "p_value": mcnemar_p_value(only_a, only_b)}


@dataclass(frozen=True)
class ScoreRow:
    """One image's reading as scores.jsonl stores it."""

    index: int
    caption: str
    objects: list[dict]   # per captioned object: its attributes and {"ok": {attribute: bool}}
    count_ok: bool
    all_ok: bool


def score_rows(scores, captions: list[str]) -> list[dict]:
    """The JSON rows of scores.jsonl for evaluation.shapes.ImageScore readings of captioned images."""
    return [{"index": i, "caption": caption,
             "objects": [{**want, "ok": {k: bool(v) for k, v in ok.items()}}
                         for want, ok in zip(score.expected, score.matched)],
             "count_ok": bool(score.count_ok), "all_ok": bool(score.all_ok)}
            for i, (score, caption) in enumerate(zip(scores, captions))]


def read_scores(run: Path) -> list[ScoreRow]:
    """The per-image readings of an evaluation folder (its scores.jsonl; a numbered output folder holding one
    evaluation is also accepted)."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"evaluation folder {str(run)!r} does not exist")
    path = run / "scores.jsonl"
    if not path.is_file():
        inner = sorted(run.glob("*/scores.jsonl"))
        if len(inner) == 1:
            path = inner[0]
        elif len(inner) > 1:
            raise UserError(f"{str(run)!r} holds {len(inner)} evaluations ({', '.join(str(p.parent) for p in inner)}):"
                            f" name one of them")
        else:
            raise UserError(f"{str(run)!r} has no scores.jsonl (evaluations made before it was written have only "
                            f"results.json): score its images again with `python tools/evaluate.py folder "
                            f"{run}/images`, or `folder` on RUN/images of the numbered folder inside")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rows.append(ScoreRow(int(d["index"]), str(d["caption"]), list(d["objects"]), bool(d["count_ok"]),
                                 bool(d["all_ok"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: line {number} is not a reading of scores.jsonl ({e}); evaluate again") from None
    if not rows:
        raise UserError(f"{path} holds no readings")
    return rows


def check_same_scenes(a: list[ScoreRow], b: list[ScoreRow], names: tuple[str, str]) -> None:
    """Refuse a comparison of evaluations of different scenes (paired only when the captions match one to one)."""
    if len(a) != len(b):
        raise UserError(f"{names[0]} read {len(a)} images and {names[1]} {len(b)}: a paired comparison needs the same "
                        f"scenes (the same evaluation.num_images and evaluation.seed)")
    for x, y in zip(a, b):
        if x.caption != y.caption:
            raise UserError(f"image {x.index} has caption {x.caption!r} in {names[0]} but {y.caption!r} in {names[1]}: "
                            f"not the same scenes (evaluation.seed or the split differ)")


def compare(a: list[ScoreRow], b: list[ScoreRow], group: str = "single") -> dict:
    """Paired differences (B - A) per attribute over the images of `group` (single | multi | all): the attributes
    over their captioned objects, count and all over images."""
    keep = {"single": lambda r: len(r.objects) == 1, "multi": lambda r: len(r.objects) > 1,
            "all": lambda r: True}[group]
    pairs = [(x, y) for x, y in zip(a, b) if keep(x)]
    out = {}
    for attribute in ATTRIBUTE_COLUMNS:
        flags = [(ox["ok"][attribute], oy["ok"][attribute]) for x, y in pairs for ox, oy in zip(x.objects, y.objects)]
        out[attribute] = paired_difference([f[0] for f in flags], [f[1] for f in flags])
    out["count"] = paired_difference([x.count_ok for x, _ in pairs], [y.count_ok for _, y in pairs])
    out["all"] = paired_difference([x.all_ok for x, _ in pairs], [y.all_ok for _, y in pairs])
    return out

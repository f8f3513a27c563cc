"""Score a set of generated shapes images against their captions; write JSON, a Markdown table and a PNG of the
worst cases.

    results, scores = evaluate_images(images, captions, real=real_images)
    write_report(out_dir, results, scores, images, captions, real_images)
"""

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common.files import atomic_path
from data.synthetic import parse_caption
from evaluation.frechet import frechet_distance_of
from evaluation.paired import score_rows
from evaluation.shapes import ATTRIBUTES, ImageScore, read_candidates, score_image, shape_features, summarise

COLUMNS = (*ATTRIBUTES, "count", "all", "no_object")
HEADERS = {"no_object": "no object"}


def evaluate_images(images: list[np.ndarray], captions: list[str], real: list[np.ndarray] | None = None,
                    progress: bool = True) -> tuple[dict, list[ImageScore]]:
    """Caption accuracy per attribute for single-object, multi-object and all captions, and the Frechet distance
    between evaluator features of the images and of the real images (when given). Images are RGB uint8 (H, W, 3).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    expected = [parse_caption(c) for c in captions]  # fails early, naming the caption it cannot read
    scores, features = [], []
    for image, objects in tqdm(list(zip(images, expected)), desc="reading shapes", disable=not progress):
        score = score_image(objects, read_candidates(image))
        scores.append(score)
        features.append(shape_features(image, score.detected))
    groups = {"single": [s for s in scores if len(s.expected) == 1],
              "multi": [s for s in scores if len(s.expected) > 1], "all": scores}
    results = {"images": len(images), "groups": {k: summarise(v) for k, v in groups.items() if v}}
    if real is not None:
        real_features = [shape_features(r) for r in tqdm(real, desc="real features", disable=not progress)]
        results["frechet_distance"] = frechet_distance_of(np.stack(features), np.stack(real_features))
        results["real_images"] = len(real)
    return results, scores


def markdown_table(results: dict) -> str:
    """Accuracy (%) per group of captions, the share of images read as holding no object, and the Frechet
    distance."""
    lines = ["| captions | images | " + " | ".join(HEADERS.get(c, c) for c in COLUMNS) + " | mean IoU |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for group, summary in results["groups"].items():
        cells = " | ".join(f"{summary[c]:.1f}" if c in summary else "-" for c in COLUMNS)
        lines.append(f"| {group} | {summary['images']} | {cells} | {summary['mean_iou']:.3f} |")
    for group, summary in results["groups"].items():
        by_kind = ", ".join(f"{k} {v:.1f}" for k, v in summary.get("kind_by_kind", {}).items())
        if by_kind:
            lines.append(f"\nKind accuracy by captioned kind ({group}): {by_kind}")
    for group, summary in results["groups"].items():
        errors = ", ".join(f"{HEADERS.get(k, k)} {v:.1f}" for k, v in summary.get("stderr", {}).items())
        if errors:
            lines.append(f"\nStandard errors of the accuracies ({group}; sqrt(p (1 - p) / n), in points): {errors}")
    if "frechet_distance" in results:
        lines.append("")
        lines.append(f"Frechet distance to {results['real_images']} real images (evaluator features): "
                     f"{results['frechet_distance']:.4f}")
    return "\n".join(lines) + "\n"


def _read_text(score: ImageScore) -> str:
    """What the reader found, and the best candidate it rejected when it found nothing."""
    if score.detected:
        return "read: " + "; ".join(f"{d.size} {d.color} {d.kind} {d.position} ({d.iou:.2f})" for d in score.detected)
    if score.rejected:
        d = max(score.rejected, key=lambda r: r.iou)
        return (f"read: no object (rejected: {d.color} {d.kind}, IoU {d.iou:.2f}, palette {d.palette_share:.2f}, "
                f"background {d.background:.2f})")
    return "read: no object"


def worst_cases(path: Path, scores: list[ImageScore], images: list[np.ndarray], captions: list[str],
                real: list[np.ndarray] | None = None, count: int = 16, scale: int = 96) -> Path:
    """PNG grid of the images furthest from their captions: generated | real, the caption and what was read."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].errors(),
                                                      np.mean([d.iou for d in scores[i].detected] or [0])))
    picks = [i for i in order[:count]]
    font = ImageFont.load_default()
    panels = 2 if real is not None else 1
    tile_w, text_h = panels * scale + (panels - 1) * 4, 64
    cols = min(4, max(1, len(picks)))
    rows = -(-len(picks) // cols)
    sheet = Image.new("RGB", (cols * (tile_w + 8) + 8, rows * (scale + text_h + 8) + 8), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    chars = max(10, tile_w // 6)
    for n, i in enumerate(picks):
        x, y = 8 + (n % cols) * (tile_w + 8), 8 + (n // cols) * (scale + text_h + 8)
        sources = [images[i]] + ([real[i]] if real is not None else [])
        for p, src in enumerate(sources):
            tile = Image.fromarray(src).resize((scale, scale * src.shape[0] // src.shape[1]), Image.NEAREST)
            sheet.paste(tile, (x + p * (scale + 4), y))
        text = textwrap.wrap(f"{captions[i]}", chars)[:2] + textwrap.wrap(_read_text(scores[i]), chars)[:3]
        draw.multiline_text((x, y + scale + 2), "\n".join(text), fill=(0, 0, 0), font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_report(out_dir: Path, results: dict, scores: list[ImageScore], images: list[np.ndarray],
                 captions: list[str], real: list[np.ndarray] | None = None, extra: dict | None = None) -> dict:
    """results.json, results.md, scores.jsonl (each image's reading: evaluation/paired.py) and worst.png in out_dir;
    returns the JSON written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**(extra or {}), **results}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    header = "".join(f"- {k}: {v}\n" for k, v in (extra or {}).items())
    (out_dir / "results.md").write_text(header + ("\n" if header else "") + markdown_table(results))
    with atomic_path(out_dir / "scores.jsonl") as tmp:  # per image, for paired comparisons (tools/compare_evals.py)
        Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in score_rows(scores, captions)))
    worst_cases(out_dir / "worst.png", scores, images, captions, real)
    return record

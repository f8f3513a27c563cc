"""Histograms of what the shapes reader's acceptance thresholds are chosen from (docs/reader_thresholds.png).

    python tools/reader_thresholds.py OUT.png RUN [RUN ...]     # RUN: `evaluate.py model` output folders

For every candidate object (evaluation/shapes.py read_candidates) of real renders of the held-out scenes, of the
generated images in each RUN's images/ and of degenerate images (evaluation/degenerate.py), the template fit (IoU)
and the palette share; and each image's background share. One panel per measure, one row of bars per source,
with the threshold drawn in.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.synthetic import render, scene_at
from evaluation.config import EvaluationConfig
from evaluation.degenerate import degenerate_images
from evaluation.shapes import MIN_BACKGROUND_SHARE, MIN_IOU, MIN_PALETTE_SHARE, read_candidates

MEASURES = (("template fit (IoU)", "iou", MIN_IOU), ("palette share", "palette_share", MIN_PALETTE_SHARE),
            ("background share", "background", MIN_BACKGROUND_SHARE))


def measure(images: list[np.ndarray]) -> dict[str, list[float]]:
    """Per measure, the values of every candidate (IoU, palette share) or image (background share)."""
    out = {key: [] for _, key, _ in MEASURES}
    for image in images:
        candidates = read_candidates(image)
        out["iou"] += [d.iou for d in candidates]
        out["palette_share"] += [d.palette_share for d in candidates]
        out["background"] += [candidates[0].background] if candidates else []
    return out


def histogram_png(sources: dict[str, dict[str, list[float]]], path: Path, bins: int = 20) -> None:
    """One column per measure, one row per source: bars of the share of values in each of `bins` bins of [0, 1]."""
    cell_w, cell_h, pad, label_w = 300, 90, 24, 120
    sheet = Image.new("RGB", (label_w + len(MEASURES) * (cell_w + pad), 30 + len(sources) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (title, _, threshold) in enumerate(MEASURES):
        draw.text((label_w + c * (cell_w + pad), 8), f"{title}; threshold {threshold}", fill="black")
    for r, (name, values) in enumerate(sources.items()):
        y0 = 30 + r * (cell_h + pad)
        draw.text((4, y0 + cell_h // 2), name, fill="black")
        for c, (_, key, threshold) in enumerate(MEASURES):
            x0 = label_w + c * (cell_w + pad)
            v = np.clip(np.asarray(values[key], dtype=float), 0, 1)
            counts = np.histogram(v, bins=bins, range=(0, 1))[0] / max(len(v), 1)
            draw.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], outline=(180, 180, 180))
            for b, share in enumerate(counts):
                h = share * cell_h
                draw.rectangle([x0 + b * cell_w / bins + 1, y0 + cell_h - h, x0 + (b + 1) * cell_w / bins - 1,
                                y0 + cell_h], fill=(60, 110, 200))
            tx = x0 + threshold * cell_w
            draw.line([tx, y0, tx, y0 + cell_h], fill=(220, 40, 40), width=2)
            draw.text((x0 + 2, y0 + cell_h + 2), f"n={len(v)}  0 .. 1", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("runs", type=Path, nargs="*", help="`evaluate.py model` output folders (their images/)")
    args = parser.parse_args(argv)
    ec = EvaluationConfig()
    real = [np.asarray(render(o, w, h)) for w, h, o in (scene_at(ec.seed, i, [(ec.width, ec.height)], ec.scene())
                                                         for i in range(300))]
    sources = {"real renders": measure(real)}
    for run in args.runs:
        files = sorted(run.glob("images/*.png")) or sorted(run.glob("*/images/*.png"))
        if not files:
            print(f"error: {run} holds no images/ of an `evaluate.py model` run", file=sys.stderr)
            return 2
        sources[run.name] = measure([np.asarray(Image.open(f).convert("RGB")) for f in files])
    degenerate = degenerate_images(np.random.default_rng(0), sides=(32, 64), per_kind=10)
    sources["degenerate"] = measure([image for _, image in degenerate])
    histogram_png(sources, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two readers side by side: how often the exact reader (evaluation/shapes.py) and the classifier
(evaluation/classifier.py) read the same kind, colour, size and position in an image, and where they do not.

Each image's main object is, for the exact reader, its largest acceptable detection, and for the classifier, what
its heads answer (it was trained to read the largest object). Both readers also say whether there is an object at
all. Agreement on an attribute is counted over the images where both see an object; images where only one of them
does are counted apart ("object" agreement). Captions split the images into single- and multi-object groups (in a
multi-object image the largest object can be a near tie, so the single-object group is the measure) and give each
reader's own caption accuracy on single-object images.

    pairs = read_both(images, captions, classifier)
    summary = agreement(pairs)                       # {"single": {...}, "multi": {...}, "all": {...}}
    disagreement_grid(pairs, images, "disagreements.png")
    abstaining_agreement(pairs, "kind", min_fit=0.7, min_confidence=0.9)  # both may answer "no clear kind"
"""

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.synthetic import parse_caption
from evaluation.classifier import Reading, ShapeClassifier, classify
from evaluation.shapes import ATTRIBUTES, Detection, read_shapes


@dataclass(frozen=True)
class PairReading:
    """What both readers read in one image."""

    caption: str
    objects: int                     # objects the caption names
    exact: Detection | None          # the exact reader's largest acceptable detection (None: no object)
    learned: Reading                 # the classifier's reading

    @property
    def both_see_object(self) -> bool:
        return self.exact is not None and self.learned.has_object

    @property
    def object_agrees(self) -> bool:
        return (self.exact is not None) == self.learned.has_object

    def agrees(self, attribute: str) -> bool:
        """Both see an object and read the same value of `attribute`."""
        return self.both_see_object and self.exact.attributes()[attribute] == self.learned.attributes()[attribute]

    def disagreements(self) -> list[str]:
        """The attributes read differently ('object' when only one reader sees an object)."""
        if not self.object_agrees:
            return ["object"]
        return [a for a in ATTRIBUTES if self.both_see_object and not self.agrees(a)]


def read_both(images: list[np.ndarray], captions: list[str], classifier: ShapeClassifier) -> list[PairReading]:
    """Both readers' readings of each RGB uint8 image (H, W, 3)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    learned = classify(classifier, images)
    pairs = []
    for image, text, reading in zip(images, captions, learned):
        detections = read_shapes(image)  # largest first
        pairs.append(PairReading(text, len(parse_caption(text)), detections[0] if detections else None, reading))
    return pairs


def _percent(flags: list[bool]) -> float:
    return 100.0 * float(np.mean(flags)) if flags else float("nan")


def summarise_pairs(pairs: list[PairReading]) -> dict:
    """Agreement in % for a group of images: object (both or neither see one), each attribute over the images
    where both see an object, and, on single-object captions, each reader's accuracy against the caption."""
    both = [p for p in pairs if p.both_see_object]
    out = {"images": len(pairs), "both_see_object": len(both),
           "only_exact_sees_object": sum(p.exact is not None and not p.learned.has_object for p in pairs),
           "only_classifier_sees_object": sum(p.exact is None and p.learned.has_object for p in pairs),
           "object": _percent([p.object_agrees for p in pairs])}
    out.update({a: _percent([p.agrees(a) for p in both]) for a in ATTRIBUTES})
    single = [p for p in pairs if p.objects == 1]
    if single:
        wanted = [parse_caption(p.caption)[0] for p in single]
        for name, read in (("exact", lambda p: p.exact.attributes() if p.exact is not None else None),
                           ("classifier", lambda p: p.learned.attributes() if p.learned.has_object else None)):
            out[f"{name}_caption_accuracy"] = {
                a: _percent([(r := read(p)) is not None and r[a] == getattr(w, a) for p, w in zip(single, wanted)])
                for a in ATTRIBUTES}
    return out


def agreement(pairs: list[PairReading]) -> dict:
    """summarise_pairs for single-object captions, multi-object captions and all."""
    groups = {"single": [p for p in pairs if p.objects == 1], "multi": [p for p in pairs if p.objects > 1],
              "all": pairs}
    return {name: summarise_pairs(group) for name, group in groups.items() if group}


def _attribute_confidence(pair: PairReading, attribute: str) -> tuple[float, float]:
    """(the exact reader's template IoU, the classifier's softmax probability for `attribute`). The IoU is the fit
    that decides the exact reader's kind and size; for colour and position it is only a proxy of its confidence."""
    return pair.exact.iou, pair.learned.confidence[attribute]


def agreement_by_confidence(pairs: list[PairReading], attribute: str = "kind",
                            fit_edges: tuple[float, ...] = (0.4, 0.7, 0.8, 0.9, 1.01),
                            confidence_edges: tuple[float, ...] = (0.0, 0.8, 0.95, 0.99, 1.01)) -> dict:
    """Agreement on `attribute` (%, images where both see an object) in bins of each reader's own confidence:
    {"exact_fit": [(lo, hi, images, agreement)], "classifier_confidence": [...]}."""
    both = [p for p in pairs if p.both_see_object]
    out = {}
    for name, index, edges in (("exact_fit", 0, fit_edges), ("classifier_confidence", 1, confidence_edges)):
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            group = [p for p in both if lo <= _attribute_confidence(p, attribute)[index] < hi]
            rows.append((lo, hi, len(group), _percent([p.agrees(attribute) for p in group])))
        out[name] = rows
    return out


def abstaining_agreement(pairs: list[PairReading], attribute: str, min_fit: float, min_confidence: float) -> dict:
    """Agreement on `attribute` when each reader may answer "unclear": the exact reader below template IoU
    `min_fit`, the classifier below softmax probability `min_confidence`. Two unclear answers agree; an unclear
    answer and a value do not. Over the images where both see an object; in %."""
    both = [p for p in pairs if p.both_see_object]
    agree, exact_unclear, learned_unclear = [], [], []
    for p in both:
        fit, confidence = _attribute_confidence(p, attribute)
        e, c = fit < min_fit, confidence < min_confidence
        exact_unclear.append(e)
        learned_unclear.append(c)
        agree.append((e and c) or (not e and not c and p.agrees(attribute)))
    return {"agreement": _percent(agree), "exact_unclear": _percent(exact_unclear),
            "classifier_unclear": _percent(learned_unclear)}


def confidence_markdown(pairs: list[PairReading], attribute: str = "kind") -> str:
    """Agreement on `attribute` by each reader's confidence, and with an "unclear" answer at a grid of thresholds."""
    bins = agreement_by_confidence(pairs, attribute)
    lines = [f"{attribute.capitalize()} agreement by each reader's confidence (images where both see an object):",
             "", "| exact reader's template IoU | images | agreement |", "|---|---|---|"]
    lines += [f"| {lo:.2f}-{min(hi, 1.0):.2f} | {n} | {a:.1f} |" for lo, hi, n, a in bins["exact_fit"]]
    lines += ["", "| classifier's probability | images | agreement |", "|---|---|---|"]
    lines += [f"| {lo:.2f}-{min(hi, 1.0):.2f} | {n} | {a:.1f} |" for lo, hi, n, a in bins["classifier_confidence"]]
    lines += ["", f"{attribute.capitalize()} agreement when each reader may answer \"unclear\" below a threshold "
              "(two unclear answers agree):", "",
              "| min IoU | min probability | exact unclear | classifier unclear | agreement |", "|---|---|---|---|---|"]
    for fit in (0.0, 0.6, 0.7, 0.8):
        for confidence in (0.0, 0.8, 0.9, 0.95):
            r = abstaining_agreement(pairs, attribute, fit, confidence)
            lines.append(f"| {fit:.2f} | {confidence:.2f} | {r['exact_unclear']:.1f} | {r['classifier_unclear']:.1f} "
                         f"| {r['agreement']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    """The agreement table, and each reader's caption accuracy on single-object images."""
    head = "| captions | images | both see an object | object | " + " | ".join(ATTRIBUTES) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for group, s in summary.items():
        lines.append(f"| {group} | {s['images']} | {s['both_see_object']} | {s['object']:.1f} | "
                     + " | ".join(f"{s[a]:.1f}" for a in ATTRIBUTES) + " |")
    single = summary.get("single", {})
    if "exact_caption_accuracy" in single:
        lines += ["", "Caption accuracy of each reader on single-object captions (main object; no object = wrong):",
                  "", "| reader | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]
        for name in ("exact", "classifier"):
            acc = single[f"{name}_caption_accuracy"]
            lines.append(f"| {name} | " + " | ".join(f"{acc[a]:.1f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines) + "\n"


def _describe(attributes: dict | None) -> str:
    if attributes is None:
        return "no object"
    return f"{attributes['size']} {attributes['color']} {attributes['kind']} {attributes['position']}"


def disagreement_grid(pairs: list[PairReading], images: list[np.ndarray], path: str | Path, count: int = 48,
                      scale: int = 96) -> int:
    """PNG grid of (up to `count`) images the readers read differently, single-object captions first: the image,
    its caption, what each reader read. Returns how many images disagree."""
    order = sorted((i for i, p in enumerate(pairs) if p.disagreements()), key=lambda i: (pairs[i].objects > 1, i))
    picks = order[:count]
    font = ImageFont.load_default()
    tile_w, cols, chars = scale + 130, 4, 21
    rows = max(1, -(-len(picks) // cols))
    sheet = Image.new("RGB", (cols * (tile_w + 8) + 8, rows * (scale + 8) + 8), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(picks):
        x, y = 8 + (n % cols) * (tile_w + 8), 8 + (n // cols) * (scale + 8)
        image = images[i]
        sheet.paste(Image.fromarray(image).resize((scale, scale * image.shape[0] // image.shape[1]), Image.NEAREST),
                    (x, y))
        p = pairs[i]
        exact = p.exact.attributes() if p.exact is not None else None
        learned = p.learned.attributes() if p.learned.has_object else None
        text = (textwrap.wrap(f"#{i}: {p.caption}", chars)[:2] + textwrap.wrap(f"exact: {_describe(exact)}", chars)
                + textwrap.wrap(f"cnn: {_describe(learned)}", chars) + ["differ: " + ", ".join(p.disagreements())])
        draw.multiline_text((x + scale + 4, y), "\n".join(text[:8]), fill=(0, 0, 0), font=font, spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return len(order)

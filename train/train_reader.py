"""Train the second shapes reader (a small CNN, evaluation/classifier.py) and ship it into weights/shapes/.

    python train/train_reader.py                                  # ~15 minutes on 2 CPU cores; ships reader.safetensors
    python train/train_reader.py --steps 300 --out /tmp/r.safetensors   # a quick try (nothing shipped)

It trains on renders of data/synthetic.py degraded like generated images (evaluation/classifier_data.py), then
measures the result on the held-out scenes of the evaluation seed: the real renders, the same renders degraded, and
degenerate images without an object. Writing into a folder with a MANIFEST.json (weights/shapes/) records the file's
hash, this command and these measurements there, as for the other shipped models.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_reader")


def held_out_sets(num_images: int = 600) -> dict[str, tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Labelled validation images: real renders of the evaluation's held-out scenes (main object), the same scenes
    degraded (a seed no training batch uses), and degenerate images without an object."""
    from data.synthetic import render, scene_at, shape_mask
    from evaluation.classifier import HEADS
    from evaluation.classifier_data import IGNORE, Degradation, empty_image, main_object
    from evaluation.config import EvaluationConfig

    ec = EvaluationConfig()
    images, labels = [], {name: [] for name in ("object", *HEADS)}
    for i in range(num_images):
        w, h, objects = scene_at(ec.seed, i, [(ec.width, ec.height)], ec.scene())
        main = main_object(objects, [shape_mask(o, w, h) for o in objects], Degradation().main_margin)
        if main is None:
            continue
        images.append(np.asarray(render(objects, w, h)))
        labels["object"].append(1)
        for name in HEADS:
            labels[name].append(HEADS[name].index(getattr(objects[main], name)))
    real = (images, {k: np.asarray(v) for k, v in labels.items()})
    from evaluation.classifier_data import training_batch

    rng = np.random.default_rng(ec.seed)
    batch, batch_labels = training_batch(rng, num_images, replace(Degradation(), p_empty=0.0))
    degraded = (list(batch), batch_labels)
    empty = [empty_image(rng, Degradation()) for _ in range(num_images // 2)]
    empties = (empty, {"object": np.zeros(len(empty), np.int64),
                       **{name: np.full(len(empty), IGNORE) for name in HEADS}})
    return {"real renders": real, "degraded renders": degraded, "no object": empties}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "shapes" / "reader.safetensors",
                        help="where the fp16 weights go (default: the shipped weights/shapes/reader.safetensors)")
    parser.add_argument("--steps", type=int, default=6000, help="optimiser steps (default 6000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        if args.steps < 1 or args.batch_size < 2:
            raise UserError(f"--steps must be >= 1 and --batch-size >= 2, got {args.steps} and {args.batch_size}")
        if args.out.suffix != ".safetensors":
            raise UserError(f"--out {args.out} must end in .safetensors")
    except UserError as e:
        log.error("error: %s", e)
        return 2
    import torch

    from evaluation.classifier import save_classifier
    from evaluation.classifier_training import TrainConfig, accuracy_on, train_classifier

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    model, history = train_classifier(cfg, progress=not args.no_progress)
    seconds = round(time.perf_counter() - start, 1)
    validation = {name: {k: round(v, 2) for k, v in accuracy_on(model, images, labels).items()}
                  for name, (images, labels) in held_out_sets().items()}
    for name, scores in validation.items():
        log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in scores.items()))
    command = "python train/train_reader.py" + ("" if args.steps == 6000 else f" --steps {args.steps}") + (
        "" if args.batch_size == 128 else f" --batch-size {args.batch_size}") + (
        "" if args.seed == 0 else f" --seed {args.seed}")
    save_classifier(model, args.out, {"command": command, "steps": str(args.steps)})
    log.info("wrote %s (%d bytes) after %.0f s of training on %d threads", args.out, args.out.stat().st_size,
             seconds, torch.get_num_threads())
    from models.shipped import MANIFEST_NAME, read_manifest, write_manifest

    manifest = args.out.parent / MANIFEST_NAME
    if manifest.is_file():
        models = read_manifest(manifest).get("models", {})
        models["reader"] = {
            "files": [args.out.name], "command": command,
            "what": "second shapes reader: a CNN (5 conv layers, fp16) reading object / kind / colour / size / "
                    "position of an image's largest object, trained on degraded renders; tools/evaluate.py agree",
            "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                      "seconds": seconds, "threads": torch.get_num_threads(),
                      "final_loss": round(sum(v for k, v in history[-1].items() if k not in ("step", "lr")), 4)},
            "validation": validation}
        log.info("manifest %s", write_manifest(args.out.parent, models))
    print(json.dumps(validation, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

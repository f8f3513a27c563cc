"""The second shapes reader (evaluation/classifier.py): the shipped weights read held-out renders and see no object
in degenerate images; files round-trip and bad ones are refused; a few training steps lower the loss."""

import numpy as np
import pytest
import torch

from data.synthetic import render, scene_at, shape_mask
from evaluation.classifier import ClassifierError, ShapeClassifier, classify, load_classifier, save_classifier
from evaluation.classifier_data import Degradation, main_object, training_batch
from evaluation.config import EvaluationConfig
from evaluation.degenerate import degenerate_images

SHIPPED = "weights/shapes/reader.safetensors"


def test_shipped_classifier_reads_held_out_renders():
    """>= 98% per attribute on the main object of the held-out real renders (the exact reader is not involved)."""
    ec, model = EvaluationConfig(), load_classifier(SHIPPED)
    images, mains = [], []
    for i in range(200):
        w, h, objects = scene_at(ec.seed, i, [(ec.width, ec.height)], ec.scene())
        main = main_object(objects, [shape_mask(o, w, h) for o in objects], Degradation().main_margin)
        if main is not None:
            images.append(np.asarray(render(objects, w, h)))
            mains.append(objects[main])
    readings = classify(model, images)
    assert all(r.has_object for r in readings)
    for attribute in ("kind", "color", "size", "position"):
        right = np.mean([getattr(r, attribute) == getattr(o, attribute) for r, o in zip(readings, mains)])
        assert right >= 0.98, (attribute, right)


def test_shipped_classifier_sees_no_object_in_degenerate_images():
    images = [image for _, image in degenerate_images(np.random.default_rng(3), sides=(32, 64), per_kind=2)]
    images = [im for im in images if not (im == 255).all()] + [np.full((32, 32, 3), 255, np.uint8)]
    assert not any(r.has_object for r in classify(load_classifier(SHIPPED), images))


def test_save_load_round_trip_and_refusals(tmp_path):
    model = ShapeClassifier().eval()
    save_classifier(model, tmp_path / "r.safetensors")
    loaded = load_classifier(tmp_path / "r.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = {k: v for k, v in model.half().float()(x).items()}  # the file holds fp16 weights
        got = loaded(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    with pytest.raises(ClassifierError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ClassifierError, match="cannot read"):
        load_classifier(tmp_path / "junk.safetensors")


@pytest.mark.slow
def test_training_lowers_the_loss():
    from evaluation.classifier_training import TrainConfig, train_classifier

    _, history = train_classifier(TrainConfig(steps=200, batch_size=32, warmup_steps=10, workers=0), progress=False)
    first, last = (sum(v for k, v in h.items() if k not in ("step", "lr")) for h in (history[0], history[-1]))
    assert last < 0.8 * first
    images, labels = training_batch(np.random.default_rng(0), 8)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8 and set(labels) >= {"object", "kind"}


def _pairs_of(readings: list[tuple[str, float, str, float]]):
    """PairReadings of one-object captions: (exact kind, exact IoU, classifier kind, classifier probability)."""
    from evaluation.agreement import PairReading
    from evaluation.classifier import Reading
    from evaluation.shapes import Detection

    pairs = []
    for exact_kind, iou, learned_kind, probability in readings:
        exact = Detection(exact_kind, "red", "large", 0.5, 0.5, 100, iou)
        learned = Reading(0.9, learned_kind, "red", "large", "center",
                          {"kind": probability, "color": 1.0, "size": 1.0, "position": 1.0})
        pairs.append(PairReading("a large red circle at the center", 1, exact, learned))
    return pairs


def test_abstaining_agreement_limits_and_bins():
    from evaluation.agreement import abstaining_agreement, agreement, agreement_by_confidence

    pairs = _pairs_of([("circle", 0.95, "circle", 0.999), ("square", 0.65, "cross", 0.55),
                       ("cross", 0.75, "square", 0.97), ("triangle", 0.85, "triangle", 0.7)])
    plain = agreement(pairs)["single"]["kind"]
    assert plain == 50.0
    assert abstaining_agreement(pairs, "kind", 0.0, 0.0)["agreement"] == plain  # nobody abstains
    everything = abstaining_agreement(pairs, "kind", 1.01, 1.01)                # everybody abstains
    assert everything == {"agreement": 100.0, "exact_unclear": 100.0, "classifier_unclear": 100.0}
    # both unclear on the square/cross pair; the triangle pair is now one value against "unclear"
    assert abstaining_agreement(pairs, "kind", 0.7, 0.8) == {"agreement": 50.0, "exact_unclear": 25.0,
                                                             "classifier_unclear": 50.0}
    bins = agreement_by_confidence(pairs, "kind")
    assert sum(n for _, _, n, _ in bins["exact_fit"]) == sum(n for _, _, n, _ in bins["classifier_confidence"]) == 4
    assert [round(a) for _, _, n, a in bins["exact_fit"] if n] == [0, 0, 100, 100]

"""Train the shapes classifier (evaluation/classifier.py) on degraded renders, and measure it.

Images are drawn fresh for every step (evaluation/classifier_data.py), so there is no data set to store and no
epoch; a run is a few thousand steps of AdamW with a cosine decay. The loss is the object head's binary
cross-entropy plus the cross-entropy of each attribute head on the images that hold an object.

This classifier does not use the project's diffusion training loop (engine/loop.py): it has no captions, cache,
EMA or resume to manage, and a run takes minutes.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.classifier import HEADS, ClassifierConfig, ShapeClassifier, classify
from evaluation.classifier_data import IGNORE, Degradation, training_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the classifier."""

    steps: int = 6000              # optimiser steps, a fresh batch each
    batch_size: int = 128
    lr: float = 2e-3               # peak AdamW learning rate (cosine decay to 0 after warm-up)
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    seed: int = 0                  # drives the images (numpy, one generator per step) and the initial weights (torch)
    workers: int = 1               # processes drawing batches beside the training one (the batches do not depend on it)
    device: str = "cpu"
    model: ClassifierConfig = ClassifierConfig()
    degradation: Degradation = Degradation()


class Batches(torch.utils.data.Dataset):
    """Batch `step` of a run: drawn by a generator seeded with (seed, step), so any worker draws the same one."""

    def __init__(self, cfg: "TrainConfig"):
        self.cfg = cfg

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.cfg.seed, step])
        return batch_tensors(*training_batch(rng, self.cfg.batch_size, self.cfg.degradation))


def batch_tensors(images: np.ndarray, labels: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, 3, 32, 32) input in [-1, 1] and label tensors of a training batch."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    return x, {name: torch.from_numpy(v) for name, v in labels.items()}


def classifier_loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Object BCE + attribute cross-entropies (over images with an object); total and per-term values."""
    terms = {"object": F.binary_cross_entropy_with_logits(out["object"], labels["object"].float())}
    if (labels["object"] == 1).any():
        terms.update({name: F.cross_entropy(out[name], labels[name], ignore_index=IGNORE) for name in HEADS})
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def train_classifier(cfg: TrainConfig = TrainConfig(), progress: bool = True) -> tuple[ShapeClassifier, list[dict]]:
    """A trained classifier (eval mode) and the logged losses (every 100 steps)."""
    torch.manual_seed(cfg.seed)
    model = ShapeClassifier(cfg.model).to(cfg.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))

    history, running = [], []
    model.train()
    batches = torch.utils.data.DataLoader(Batches(cfg), batch_size=None, num_workers=cfg.workers,
                                          prefetch_factor=4 if cfg.workers else None)
    bar = tqdm(batches, desc="reader", disable=not progress)
    for step, (x, labels) in enumerate(bar):
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        x, labels = x.to(cfg.device), {k: v.to(cfg.device) for k, v in labels.items()}
        loss, terms = classifier_loss(model(x), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running.append(terms)
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            mean = {k: float(np.mean([t.get(k, 0.0) for t in running])) for k in running[0]}
            history.append({"step": step + 1, "lr": lr_at(step), **mean})
            bar.set_postfix(loss=f"{sum(mean.values()):.3f}")
            log.info("step %d: loss %.4f (%s)", step + 1, sum(mean.values()),
                     ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
            running = []
    return model.cpu().eval(), history


def accuracy_on(model: ShapeClassifier, images: list[np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """% of images whose object answer is right, and per head % right over the images that hold an object."""
    readings = classify(model, images)
    has = labels["object"] == 1
    out = {"images": len(images),
           "object": 100.0 * float(np.mean([r.has_object == bool(o) for r, o in zip(readings, labels["object"])]))}
    for name, values in HEADS.items():
        right = [values.index(getattr(r, name)) == v for r, v, h in zip(readings, labels[name], has) if h]
        out[name] = 100.0 * float(np.mean(right)) if right else float("nan")
    return out

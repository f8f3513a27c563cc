"""The PixArt-alpha training task: the whole transformer trains on the diffusion loss (train/train.py runs it).

The objective is PixArt-alpha's: epsilon MSE plus IDDPM's variational bound for the learned variance, with
captions dropped to the learned null caption at train.class_dropout_prob.
"""

import logging
from pathlib import Path

import torch

from configs import Config
from data.features import batch_conditions
from diffusion.losses import DiffusionLoss
from engine.loop import Task
from engine.randomness import SampleRandomness
from models.autoencoder import load_autoencoder
from models.checkpoint import load_checkpoint, save_checkpoint
from models.pixart import build_pixart
from pipeline.generate import preview_images

log = logging.getLogger("train")


class PixArtAlphaTask(Task):
    """The PixArt-alpha trainer: the whole transformer is trainable, the loss is DiffusionLoss."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        if cfg.train.init_from:
            # fp32 master weights whatever the file holds (the shipped weights are fp16); autocast gives bf16/fp16
            self.model, _, _ = load_checkpoint(cfg.train.init_from, cfg.model, device=device, dtype=torch.float32)
            log.info("fine-tuning from %s", cfg.train.init_from)
        else:
            self.model = build_pixart(cfg.model, device)
        self.model.train().requires_grad_(True)
        self.schedule = cfg.diffusion.build()
        self.criterion = DiffusionLoss.from_config(cfg, self.schedule)
        self.vae = None  # loaded at the first sample grid

    def loss(self, model, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        return self.criterion.training_loss(model, batch["latent"], rng, self.cfg.train.class_dropout_prob,
                                            **batch_conditions(self.model, batch))

    def sample(self, model, batch: dict, step: int) -> torch.Tensor:
        """The cached captions drawn with the sample config (DPM-Solver, CFG with the null caption)."""
        if self.vae is None:
            self.vae = load_autoencoder(self.cfg.autoencoder, batch["latent"].device)
        return preview_images(model, self.vae, self.schedule, self.cfg.sample, batch_conditions(self.model, batch),
                              batch["latent"].shape[-2:], self.cfg.diffusion.prediction)

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        save_checkpoint(state_dict, self.cfg.model, path, "safetensors", metadata=metadata)

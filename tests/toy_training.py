"""A tiny in-memory training set and config for tests of the training loop (also run under torchrun)."""

import torch

from configs import Config, load_config
from data.buckets import BucketBatchSampler
from engine.state import latest_checkpoint, network_state


class ToyLatents(torch.utils.data.Dataset):
    """n samples of 4x8x8 latents with 8-token, 32-dim captions and 4x8x8 control latents; one bucket."""

    def __init__(self, n: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, 4, 8, 8, generator=gen) * 0.5
        self.y = torch.randn(n, 8, 32, generator=gen)
        self.mask = torch.ones(n, 8, dtype=torch.long)
        self.mask[::2, 5:] = 0
        self.buckets = {"1.0": list(range(n))}
        self.control = torch.randn(n, 4, 8, 8, generator=gen)  # control latents (ControlNet); drawn last

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latent": self.latents[i], "y": self.y[i], "mask": self.mask[i], "index": torch.tensor(i),
                "resolution": torch.tensor([64.0, 64.0]), "aspect_ratio": torch.tensor([1.0]),
                "control": self.control[i]}

    @staticmethod
    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def toy_data(cfg):
    return ToyLatents(), ToyLatents.collate, BucketBatchSampler


def toy_config(runs_dir, *overrides) -> Config:
    """The tiny transformer of tests/conftest.py with a fast, deterministic training set-up."""
    sets = ["model.arch=T", "model.depth=2", "model.hidden_size=48", "model.num_heads=4",
            "model.caption_channels=32", "model.caption_tokens=8", "model.latent_size=8", "model.pe_interpolation=1.0",
            f"train.runs_dir={runs_dir}", "train.name=toy", "train.steps=6", "train.batch_size=4",
            "train.lr=1e-3", "train.warmup_steps=2", "train.grad_clip=1.0", "train.ema_decay=0.9",
            "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=3", "train.device=cpu",
            "data.sample_captions=2", "autoencoder.kind=pixel"]
    return load_config(Config, None, [*sets, *overrides])


def last_state(run, network: str | None = None) -> dict:
    """The run's latest training checkpoint, with one trained network's entries (model, ema, optimizer, ...; the
    exported network by default) beside the run-level ones (step, rng, task, ...)."""
    state = torch.load(latest_checkpoint(run), weights_only=True)
    return {**state, **network_state(state, network)}


"""Randomness that depends only on (seed, step, sample index): identical however a global batch is split
across processes or resumed, which is what makes DDP equal one process and resume equal an uninterrupted run."""

import random

import numpy as np
import torch
from torch import Tensor


class SampleRandomness:
    """One generator per sample of a batch, seeded by (seed, step, the sample's dataset index)."""

    def __init__(self, seed: int, step: int, indices: Tensor):
        seeds = [int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]) for i in indices.tolist()]
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(self, shape: tuple, device, dtype=torch.float32) -> Tensor:
        """(N, *shape) standard normal noise, row i from sample i's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device, dtype)

    def randint(self, high: int, device) -> Tensor:
        """(N,) integers in [0, high)."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators]).to(device)

    def rand(self, device) -> Tensor:
        """(N,) uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(device)


def rng_state() -> dict:
    """Global RNG states (python, numpy, torch, cuda) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

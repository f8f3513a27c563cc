"""Shared fixtures: tiny PixArt configs and models with every weight random (no zero-init shortcuts)."""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

from models.pixart import PixArtConfig, build_pixart
from tools.random_weights import write_tiny_t5, write_tiny_vae

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now, for a torchrun rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_script(relative_path: str):
    """Import an entry script (sample/sample.py, train/train.py) as a module, to call its main() in-process."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> PixArtConfig:
    """A 2-block, 48-wide PixArt (12-dim heads) with 32-dim captions of 8 tokens: forwards in milliseconds."""
    base = dict(arch="T", depth=2, hidden_size=48, num_heads=4, caption_channels=32, caption_tokens=8,
                latent_size=16, pe_interpolation=1.0)
    return PixArtConfig(**{**base, **overrides})


def random_model(cfg: PixArtConfig, seed: int = 0, std: float = 0.2):
    """A model whose every parameter and buffer is random, so zero-initialised layers cannot hide a bug."""
    model = build_pixart(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.copy_(torch.randn(t.shape, generator=gen) * std)
    return model.eval()


def random_inputs(cfg: PixArtConfig, batch=2, height=16, width=16, seed=1, padded=True):
    """(x, t, y, mask, micro) for a model of config cfg; mask pads the tail of the first caption."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randn(batch, cfg.caption_tokens, cfg.caption_channels, generator=gen)
    mask = torch.ones(batch, cfg.caption_tokens, dtype=torch.long)
    if padded:
        mask[0, cfg.caption_tokens // 2:] = 0
    micro = {}
    if cfg.micro_conditions:
        micro = dict(resolution=torch.tensor([[height * 8.0, width * 8.0]] * batch),
                     aspect_ratio=torch.tensor([[height / width]] * batch))
    return x, t, y, mask, micro


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))

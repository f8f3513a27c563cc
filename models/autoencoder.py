"""Image <-> latent autoencoders: the SD VAE PixArt-alpha is trained on, and an identity for pixel-space experiments.

    vae = load_autoencoder(cfg.autoencoder, device="cuda")
    z = vae.encode(images)    # (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8), already multiplied by the scale
    images = vae.decode(z)    # back to (N, 3, H, W) in [-1, 1]

Weights are only read from disk (`local_files_only=True`): nothing here downloads.
"""

import json
import logging
from pathlib import Path

import torch

from models.config import AutoencoderConfig, AutoencoderError
from models.text_encoder import local_snapshot, parse_dtype

log = logging.getLogger(__name__)

KINDS = ("sd-vae", "pixel")
DOWNLOAD_HINT = ('hf download PixArt-alpha/PixArt-XL-2-1024-MS --include "vae/*" --local-dir <folder>  '
                 "(or: hf download stabilityai/sd-vae-ft-ema --local-dir <folder>; then set autoencoder.path)")




def resolve_vae(path: str) -> tuple[Path, dict]:
    """(folder, config.json contents) of an AutoencoderKL folder or a pipeline root's vae/; errors before loading."""
    root = local_snapshot(path)
    if root is None:
        raise AutoencoderError(f"autoencoder {path!r}: no such folder, and not a hub id in the local Hugging Face "
                               f"cache (nothing is downloaded). Get the weights with:\n  {DOWNLOAD_HINT}")
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise AutoencoderError(f"autoencoder {str(root)!r} has neither config.json (an AutoencoderKL folder) nor "
                               f"vae/config.json (a pipeline root). Get the weights with:\n  {DOWNLOAD_HINT}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise AutoencoderError(f"{str(folder / 'config.json')!r} describes a {config.get('_class_name')!r}, not an "
                               f"AutoencoderKL: point autoencoder.path at the VAE folder or a pipeline root with vae/")
    return folder, config


def latent_channels_of(cfg: "AutoencoderConfig") -> int:
    """Latent channels of the autoencoder cfg names, from config.json alone (no weights are read)."""
    if cfg.kind == "pixel":
        return PixelSpace.latent_channels
    _check_kind(cfg.kind)
    return int(resolve_vae(cfg.path)[1].get("latent_channels", 4))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise AutoencoderError(f"unknown autoencoder.kind {kind!r}; valid: {', '.join(KINDS)}")


class SDVAE:
    """diffusers' AutoencoderKL with the latent scale applied: encode gives scale * z, decode divides it out."""

    def __init__(self, vae, scale: float):  # a diffusers AutoencoderKL
        self.vae = vae
        self.scale = scale
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the SD VAE

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f); the posterior mean if not sample."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()  # (N, C, H/f, W/f)
        return (z * self.scale).to(images.dtype)

    def compile(self, channels_last: bool = False) -> None:
        """torch.compile the decoder (models/compiled.py: one graph per latent size, eager fallback); channels_last
        stores its convolution weights (and so its activations) channels-last, the layout GPU convolutions run
        fastest in."""
        from models.compiled import compile_module

        if channels_last:
            self.vae.decoder.to(memory_format=torch.channels_last)
        self.vae.decoder = compile_module(self.vae.decoder, "the VAE decoder", self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f), about [-1, 1] (not clamped)."""
        images = self.vae.decode(latents.to(self.device, self.dtype) / self.scale).sample  # (N, 3, H, W)
        return images.to(latents.dtype)


class PixelSpace:
    """The identity autoencoder: the latent is the image itself (3 channels, no downsampling, scale 1)."""

    latent_channels = 3
    downsample = 1
    scale = 1.0

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Images (N, 3, H, W) -> the same tensor."""
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, 3, H, W) -> the same tensor."""
        return latents

    def compile(self, channels_last: bool = False) -> None:
        """Nothing to compile."""


def load_autoencoder(cfg: AutoencoderConfig, device: str | torch.device = "cpu") -> SDVAE | PixelSpace:
    """The autoencoder cfg names, frozen, on `device`."""
    _check_kind(cfg.kind)
    if cfg.kind == "pixel":
        return PixelSpace()
    dtype = parse_dtype(cfg.dtype, "autoencoder.dtype")
    folder, _ = resolve_vae(cfg.path)
    from diffusers import AutoencoderKL  # loads when used, so reading a config stays cheap

    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    scale = cfg.scale if cfg.scale is not None else float(vae.config.scaling_factor)
    log.info("autoencoder %s: %d latent channels, 1/%d resolution, scale %g, %s", folder,
             vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1), scale, cfg.dtype)
    return SDVAE(vae, scale)

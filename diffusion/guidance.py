"""Classifier-free guidance as a closure: turns a conditional noise model into a sampler's denoise(x, t)."""

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion.samplers.common import Denoise, per_sample

EpsModel = Callable[..., Tensor]  # eps_model(x, t, **conditions) -> eps (N, C, H, W)


def _cat(a, b):
    return torch.cat([a, b]) if isinstance(a, Tensor) else a


def conditional_denoiser(eps_model: EpsModel, cond: dict) -> Denoise:
    """denoise(x, t) = eps(x, t | cond): no guidance, one network call per step."""
    return lambda x, t: eps_model(x, t, **cond)


def classifier_free_guidance(eps_model: EpsModel, cond: dict, uncond: dict, scale: float | Tensor) -> Denoise:
    """denoise(x, t) = eps_u + scale (eps_c - eps_u), both halves in one batched network call.

    cond / uncond are keyword conditions of eps_model with the same keys (tensors batched like x). For PixArt's
    official behaviour uncond is cond with drop_caption set (the learned null caption); for diffusers' it holds
    an encoded negative prompt. scale = 1 is the conditional model; scale 4.5 is PixArt-alpha's default; a tensor
    (N,) guides each sample with its own scale (consistency distillation's w ~ U[w_min, w_max]).
    The LCM papers write guidance as eps_c + w (eps_c - eps_u): that is scale = 1 + w.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must hold the same conditions, got {sorted(cond)} and {sorted(uncond)}")
    both = {k: _cat(cond[k], uncond[k]) for k in cond}  # (2N, ...) conditional rows first

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        eps_c, eps_u = eps_model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (N, C, H, W) each
        return eps_u + per_sample(scale, eps_c).to(eps_c.dtype) * (eps_c - eps_u)

    return denoise


def null_caption_pair(cond: dict) -> tuple[dict, dict]:
    """(cond, uncond) for PixArt's official guidance: uncond replaces every caption by the learned null caption.

    The caption mask is kept, as the official sampler does (its null caption attends to the prompt's tokens).
    """
    y = cond["y"]
    keep = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    return {**cond, "drop_caption": keep}, {**cond, "drop_caption": ~keep}

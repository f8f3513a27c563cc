"""Where does a model decide an attribute? Noise real renders to a timestep t0, denoise them back with the caption,
and read the result with the exact shapes reader.

At a small t0 the image still shows every attribute, so a working model keeps them all; at t0 near T nothing of the
image is left and the caption alone decides. The t0 where an attribute's accuracy falls is where the model must
take it from the caption. With `swap`, the caption names another value of one attribute (another kind, say) than
the image holds: the share of results that follow the caption, against the share that keep the image's value, says
whether the model reads that word at all (it follows the image at small t0 and should follow the caption above).
"""

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from data.synthetic import KINDS, PALETTE, SIZES, ShapeObject, caption
from diffusion.schedule import NoiseSchedule
from evaluation.shapes import ATTRIBUTES, read_shapes, score_image, summarise

SWAPPABLE = {"kind": KINDS, "color": tuple(PALETTE), "size": tuple(SIZES)}


def timestep_grid(t0: int, steps: int) -> list[int]:
    """steps + 1 timesteps from t0 down to 0, evenly spaced and rounded (t0 first, 0 last)."""
    return [int(t) for t in np.linspace(t0, 0, steps + 1).round()]


def denoise_from(denoise: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: NoiseSchedule, t0: int,
                 steps: int, noise: Tensor) -> Tensor:
    """x0 (N, C, H, W) noised to t0 with `noise`, then deterministic DDIM (eta 0) over timestep_grid(t0, steps) with
    the eps-predicting denoise(x, t); returns the last data prediction (N, C, H, W)."""
    grid = timestep_grid(t0, steps)
    t = torch.full((len(x0),), t0, dtype=torch.long, device=x0.device)
    x = schedule.q_sample(x0, t, noise)
    for i, step in enumerate(grid[:-1]):
        t = torch.full((len(x0),), step, dtype=torch.long, device=x0.device)
        alpha, sigma = schedule.alpha_sigma(t, x)
        eps = denoise(x, t)
        pred = (x - sigma * eps) / alpha  # data prediction
        if i == len(grid) - 2:
            return pred
        alpha_next, sigma_next = schedule.alpha_sigma(torch.full_like(t, grid[i + 1]), x)
        x = alpha_next * pred + sigma_next * eps
    raise ValueError(f"denoise_from needs steps >= 1, got {steps}")


def swap_attribute(objects: Sequence[ShapeObject], attribute: str, index: int) -> list[ShapeObject]:
    """The scene with `attribute` of every object replaced by another value (a different one for each index, so
    the swapped values are spread evenly over the alternatives)."""
    if attribute not in SWAPPABLE:
        raise ValueError(f"cannot swap {attribute!r}; swappable: {', '.join(SWAPPABLE)}")
    values = SWAPPABLE[attribute]
    out = []
    for o in objects:
        shift = 1 + index % (len(values) - 1)  # never 0: the value always changes
        out.append(replace(o, **{attribute: values[(values.index(getattr(o, attribute)) + shift) % len(values)]}))
    return out


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) in [-1, 1] -> RGB uint8 arrays (H, W, 3)."""
    return list(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def score_probe(images: list[np.ndarray], shown: list[list[ShapeObject]], captioned: list[list[ShapeObject]],
                attribute: str | None) -> dict:
    """Caption accuracy per attribute (summarise) and, when an attribute was swapped, the shares of objects whose
    read value follows the caption ("follows_caption") and the image ("keeps_image"), in %."""
    detected = [read_shapes(image) for image in images]
    result = summarise([score_image(c, d) for c, d in zip(captioned, detected)])
    if attribute is not None:
        kept = summarise([score_image(s, d) for s, d in zip(shown, detected)])
        result = {**result, "follows_caption": result[attribute], "keeps_image": kept[attribute]}
    return result


def probe_scenes(denoise_for: Callable[[list[str]], Callable], scenes: list[list[ShapeObject]], real: Tensor,
                 schedule: NoiseSchedule, timesteps: Sequence[int], steps: int, swap: str | None = None,
                 seed: int = 0) -> list[dict]:
    """One result per t0 (score_probe plus "t0"): real (N, 3, H, W) renders of `scenes` in [-1, 1], denoised from
    each t0 with their captions (swapped in `swap` when given); denoise_for(captions) builds the eps denoiser."""
    captioned = [swap_attribute(s, swap, i) for i, s in enumerate(scenes)] if swap else list(scenes)
    denoise = denoise_for([caption(s) for s in captioned])
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed)).to(real)
    rows = []
    for t0 in timesteps:
        with torch.inference_mode():
            images = denoise_from(denoise, real, schedule, int(t0), steps, noise)
        rows.append({"t0": int(t0), **score_probe(to_uint8(images), scenes, captioned, swap)})
    return rows


def prediction_grid(denoise_for: Callable[[list[str]], Callable], scenes: list[list[ShapeObject]], real: Tensor,
                    schedule: NoiseSchedule, timesteps: Sequence[int], attribute: str = "kind", seed: int = 0,
                    zoom: int = 4) -> np.ndarray:
    """What the model believes at each noise level, as an RGB uint8 picture: one row per (scene, t0), holding the
    render of the scene noised to t0, then the model's data prediction from that one input under the caption with
    each value of `attribute` (in SWAPPABLE order: for kind, circle square triangle diamond cross).

    A model that ignores the word draws the same thing in every column; one that reads it changes the columns
    where the noised image leaves the value open (at high t0 the prediction is a blur: compare size and outline).
    real: (N, 3, H, W) renders of `scenes` in [-1, 1]."""
    values = SWAPPABLE[attribute]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed)).to(real)
    rows = []
    for scene, image, eps in zip(scenes, real, noise):
        variants = [[replace(o, **{attribute: v}) for o in scene] for v in values]
        denoise = denoise_for([caption(v) for v in variants])
        batch, eps = image.expand(len(values), -1, -1, -1), eps.expand(len(values), -1, -1, -1)
        for t0 in timesteps:
            t = torch.full((1,), int(t0), dtype=torch.long, device=real.device)
            with torch.inference_mode():
                predictions = denoise_from(denoise, batch, schedule, int(t0), 1, eps)  # (K, 3, H, W)
            tiles = to_uint8(torch.cat([schedule.q_sample(image[None], t, eps[:1]), predictions]))
            rows.append(np.concatenate([np.pad(tile, ((1, 1), (1, 1), (0, 0)), constant_values=128)
                                        for tile in tiles], axis=1))
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def markdown(rows: list[dict], swap: str | None) -> str:
    """The probe's table: one row per t0."""
    cols = list(ATTRIBUTES) + ["count"] + (["follows_caption", "keeps_image"] if swap else [])
    names = list(ATTRIBUTES) + ["count"] + ([f"{swap} follows caption", f"{swap} keeps image"] if swap else [])
    lines = ["| t0 | " + " | ".join(names) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['t0']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    return "\n".join(lines)

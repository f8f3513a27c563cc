"""Edge maps for control: a hand-written Canny detector (skimage's conventions: image in [0, 1], Gaussian
sigma 1, thresholds on the raw Sobel magnitude) and the conversion of edges to a control image."""

import math

import torch
import torch.nn.functional as F

from common.errors import UserError


def _gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, H, W), reflect padding, radius ceil(3 sigma)."""
    if sigma <= 0:
        return gray
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, gray.shape[-1] - 1, gray.shape[-2] - 1)  # reflect padding needs radius < side
    x = torch.arange(-radius, radius + 1, dtype=gray.dtype)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    gray = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(gray, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep (H, W) pixels whose magnitude is a maximum along the gradient direction, quantized to 45 degrees."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # (H, W) in [0, 180)
    sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135 degrees
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]  # (H+2, W+2), zeros outside
    H, W = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    # Neighbour pairs along the gradient; rows grow downwards, so a 45-degree gradient points to (+1, +1).
    pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for s, (a, b) in enumerate(pairs):  # strict on one side: of a two-pixel plateau across a step, keep one
        local_max = (magnitude > shifted(*a)) & (magnitude >= shifted(*b))
        keep |= (sector == s) & local_max
    return keep & (magnitude > 0)


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Weak (H, W) pixels 8-connected through weak pixels to a strong one (label propagation + pointer jumping)."""
    H, W = weak.shape
    ids = torch.arange(1, H * W + 1, dtype=torch.float64).view(H, W)  # exact integers in float64
    labels = torch.where(weak, ids, torch.zeros_like(ids))
    while True:
        spread = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * weak  # max label of neighbours
        flat = spread.flatten()
        jumped = flat[(flat.long() - 1).clamp(min=0)] * (flat > 0)  # label of the pixel my label names
        new = torch.maximum(flat, jumped).view(H, W)
        if torch.equal(new, labels):
            break
        labels = new
    winners = torch.unique(labels[strong & weak])
    return torch.isin(labels, winners) & weak


def canny(image: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Canny edges of an image (3, H, W) or (H, W) in [0, 1]: (H, W) bool.

    Grayscale (ITU-R 601 luma) -> Gaussian blur -> Sobel gradients -> non-maximum suppression -> pixels with
    magnitude >= high, plus those >= low connected to them (hysteresis). The magnitude is the unnormalized
    Sobel response, so a sharp black-to-white step scores up to 4 (about 2.7 after the sigma-1 blur).
    """
    if image.dim() == 3:
        if image.shape[0] != 3:
            raise ValueError(f"canny takes (3, H, W) or (H, W) images, got {tuple(image.shape)}")
        gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # (H, W)
    elif image.dim() == 2:
        gray = image
    else:
        raise ValueError(f"canny takes (3, H, W) or (H, W) images, got {tuple(image.shape)}")
    if low > high:
        raise UserError(f"canny thresholds need low <= high, got low={low}, high={high}")
    gray = _gaussian_blur(gray.double()[None, None], sigma)  # (1, 1, H, W)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x.view(1, 1, 3, 3))[0, 0]  # (H, W), d/dx (columns)
    gy = F.conv2d(padded, sobel_x.t().contiguous().view(1, 1, 3, 3))[0, 0]  # (H, W), d/dy (rows)
    magnitude = torch.hypot(gx, gy)  # (H, W)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    return _hysteresis(thin & (magnitude >= high), thin & (magnitude >= low))


def edges_to_control(edges: torch.Tensor) -> torch.Tensor:
    """(H, W) bool edge map -> (3, H, W) control image, white edges on black, in [-1, 1]."""
    return edges.float()[None].expand(3, -1, -1) * 2 - 1

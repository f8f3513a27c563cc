"""Edge agreement between a control edge map and a generated image (the ControlNet ablation's measure).

The generated image's edges are Canny edges (data/edges.py, the settings used for training caches); the control's
edges are its white pixels. A pixel counts as matched when an edge of the other map lies within `tolerance`
pixels (Chebyshev distance), so a boundary drawn one pixel inside or outside the shape still agrees:

    precision = generated edge pixels near a control edge / generated edge pixels
    recall    = control edge pixels near a generated edge / control edge pixels
    F1        = 2 P R / (P + R)          (1.0 when both maps are empty; 0.0 when exactly one is)
"""

import numpy as np
import torch

from data.edges import canny

CANNY = {"sigma": 1.0, "low": 0.1, "high": 0.2}


def image_edges(image: np.ndarray) -> np.ndarray:
    """Canny edges (H, W) bool of an RGB uint8 image (H, W, 3)."""
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    return canny(x, **CANNY).numpy()


def control_edges(control: np.ndarray) -> np.ndarray:
    """The edge pixels (H, W) bool of a control map: RGB uint8 (H, W, 3), white edges on black."""
    return control.astype(np.float32).mean(axis=-1) > 127.5


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def edge_scores(pred: np.ndarray, ref: np.ndarray, tolerance: int = 1) -> tuple[float, float, float]:
    """(precision, recall, F1) of edge map `pred` against `ref` (both (H, W) bool), within `tolerance` pixels."""
    if pred.shape != ref.shape:
        raise ValueError(f"edge maps of different sizes: {pred.shape} and {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    if n_pred == 0 or n_ref == 0:
        return float(n_pred == 0), float(n_ref == 0), 0.0
    precision = float((pred & dilate(ref, tolerance)).sum()) / n_pred
    recall = float((ref & dilate(pred, tolerance)).sum()) / n_ref
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def edge_agreement(images: list[np.ndarray], controls: list[np.ndarray], tolerance: int = 1) -> dict[str, float]:
    """Mean precision, recall and F1 (%) of each image's Canny edges against its control map."""
    scores = np.array([edge_scores(image_edges(im), control_edges(c), tolerance) for im, c in zip(images, controls)])
    return {"edge_precision": 100 * float(scores[:, 0].mean()), "edge_recall": 100 * float(scores[:, 1].mean()),
            "edge_f1": 100 * float(scores[:, 2].mean()), "edge_tolerance_px": tolerance}

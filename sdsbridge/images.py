"""Small image utilities shared by validation grids, videos and the 2D mode."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float image in [0, 1] (C = 1 or 3) -> [H, W, 3] uint8 array."""
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    return (image.numpy() * 255.0 + 0.5).astype(np.uint8)


def depth_to_image(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """[H, W, 1] depth and opacity -> [H, W, 1] grey image: near is bright, empty space black.

    Depth is normalised over pixels with opacity > 0.5 so the object's relief is visible.
    """
    mask = opacity > 0.5
    if mask.any():
        near, far = depth[mask].min(), depth[mask].max()
        scaled = 1.0 - (depth - near) / (far - near).clamp_min(1e-6)
    else:
        scaled = torch.zeros_like(depth)
    return (scaled.clamp(0, 1) * opacity.clamp(0, 1)).float()


def image_row(rgb: torch.Tensor, opacity: torch.Tensor, depth: torch.Tensor) -> np.ndarray:
    """One view as [H, 3W, 3] uint8: rgb | opacity | depth side by side."""
    return np.concatenate([to_uint8(rgb), to_uint8(opacity), to_uint8(depth_to_image(depth, opacity))], axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    """Write a [H, W, 3] uint8 array as PNG (creating the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)

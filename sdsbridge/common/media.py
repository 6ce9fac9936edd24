"""Pictures and videos on disk: float tensors to uint8 frames, the PNG writer and the mp4 writer.

Both writers are atomic (``atomic.py``): a reader never sees half a file. Frames are [H, W, 3] uint8.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

from sdsbridge.common.atomic import atomic_path, atomic_write_bytes

VIDEO_QUALITY = 8
"""imageio-ffmpeg quality, 0 (worst) to 10 (best)."""
VIDEO_MIN_SIZE = 256
"""``video_frame`` enlarges smaller images (nearest neighbour, integer factor) to at least this many pixels."""


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


def pad_to_even(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> the same with the last row / column repeated where H / W is odd (yuv420p needs even
    sizes)."""
    pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
    return np.pad(frame, pad, mode="edge") if any(p[1] for p in pad) else frame


def video_frame(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> the same enlarged by an integer factor to >= VIDEO_MIN_SIZE pixels (nearest
    neighbour) and padded to even height and width."""
    factor = max(1, math.ceil(VIDEO_MIN_SIZE / max(image.shape[:2])))
    return pad_to_even(image.repeat(factor, axis=0).repeat(factor, axis=1))


def write_png(path: Path, image: np.ndarray) -> None:
    """[H, W, 3] uint8 -> PNG at ``path``, atomically (creating the directory)."""
    atomic_write_bytes(path, iio.imwrite("<bytes>", image, extension=".png"))


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> Path:
    """Stream [H, W, 3] uint8 frames of even height and width (all the same size) to an H.264 mp4
    (libx264, yuv420p, quality VIDEO_QUALITY) at ``fps``, atomically. ``frames`` may be a generator, so
    long videos need not be held in memory. Returns ``path``."""
    with atomic_path(path) as tmp:
        writer = None
        try:
            for frame in frames:
                if writer is None:
                    writer = imageio_ffmpeg.write_frames(
                        str(tmp), (frame.shape[1], frame.shape[0]), fps=fps, codec="libx264",
                        pix_fmt_out="yuv420p", quality=VIDEO_QUALITY, macro_block_size=2,
                        ffmpeg_log_level="error")
                    writer.send(None)  # start ffmpeg
                writer.send(np.ascontiguousarray(frame))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{path}: a video needs at least one frame")
    return Path(path)

"""File writers of the 2D mode: atomic PNGs, H.264 videos of the optimisation, metrics.jsonl upkeep."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np

from sdsbridge.atomic import atomic_write_bytes

VIDEO_FPS = 10
"""Frames per second of the optimisation video (the official 2D code's)."""
VIDEO_MIN_SIZE = 256
"""Small images are enlarged (nearest neighbour, integer factor) to at least this many pixels in videos."""


def write_png(path: Path, image: np.ndarray) -> None:
    """[H, W, 3] uint8 -> PNG at ``path``, atomically."""
    atomic_write_bytes(path, iio.imwrite("<bytes>", image, extension=".png"))


def video_frame(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> the same enlarged by an integer factor to >= VIDEO_MIN_SIZE pixels (nearest)
    and edge-padded to even height and width (what H.264 in yuv420p needs)."""
    factor = max(1, math.ceil(VIDEO_MIN_SIZE / max(image.shape[:2])))
    image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    pad = ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0))
    return np.pad(image, pad, mode="edge")


def write_video(path: Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """[H, W, 3] uint8 frames -> H.264 mp4 (imageio-ffmpeg), written beside ``path`` then renamed."""
    tmp = path.with_name(f".{path.stem}.partial.mp4")
    writer = imageio_v2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                   pixelformat="yuv420p", macro_block_size=1)
    try:
        for frame in frames:
            writer.append_data(video_frame(frame))
    finally:
        writer.close()
    os.replace(tmp, path)


def rewrite_metrics(path: Path, drop_seeds: set[int]) -> None:
    """Keep only the rows of metrics.jsonl whose seed is not about to be run again (and that parse);
    create the file if missing."""
    if not path.is_file():
        path.write_text("")
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line torn by a crash: that seed is redone anyway
            continue
        if isinstance(row, dict) and row.get("seed") not in drop_seeds:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))

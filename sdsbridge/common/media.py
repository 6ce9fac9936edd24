"""Pictures and videos on disk: float tensors to uint8 frames, the PNG writer and the mp4 writer.

Both writers are atomic (``atomic.py``): a reader never sees half a file. Frames are [H, W, 3] uint8.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

from sdsbridge.common.atomic import atomic_path, atomic_write_bytes
from sdsbridge.common.checks import shorten
from sdsbridge.common.errors import RunFailed

VIDEO_CRF = 10
"""libx264's constant rate factor, 0 (lossless) to 51 (worst): 10 is what imageio-ffmpeg's quality 8 gave."""
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
    (libx264, yuv420p, ``VIDEO_CRF``) at ``fps``, atomically. ``frames`` may be a generator, so long videos
    need not be held in memory. Returns ``path``.

    ffmpeg writes the file itself, so a full disk (or a read-only folder) fails there: it exits non-zero, and the
    pipe to it breaks ('Broken pipe') or, when it fails at the end, nothing breaks at all. Its exit status and
    its own words (kept off the terminal) are read instead: a write the OS refused is a WriteFailed naming the
    cause (atomic.py), any other failure a RunFailed quoting ffmpeg; the temporary file is removed either way."""
    with atomic_path(path) as tmp:
        ffmpeg, said = None, tempfile.TemporaryFile()  # said: what ffmpeg writes to stderr
        try:
            for frame in frames:
                if ffmpeg is None:
                    ffmpeg = _start_ffmpeg(tmp, frame.shape[1], frame.shape[0], fps, said)
                try:
                    ffmpeg.stdin.write(np.ascontiguousarray(frame).data)
                except BrokenPipeError:
                    break  # ffmpeg stopped: its exit status says why (below)
            if ffmpeg is None:
                raise ValueError(f"{path}: a video needs at least one frame")
            _finish_ffmpeg(ffmpeg, said)
        finally:
            if ffmpeg is not None:
                if ffmpeg.poll() is None:  # interrupted or failed while frames were rendered
                    ffmpeg.kill()
                ffmpeg.wait()
                try:
                    ffmpeg.stdin.close()
                except OSError:  # the frame still buffered for a dead ffmpeg
                    pass
            said.close()
    return Path(path)


def _start_ffmpeg(tmp: Path, width: int, height: int, fps: int, said: BinaryIO) -> subprocess.Popen:
    """ffmpeg reading raw rgb24 frames of ``width`` x ``height`` from its stdin and writing ``tmp``; its stderr goes
    to ``said`` (a file), its own process group keeps a Ctrl-C meant for us from reaching it."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s",
               f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", "yuv420p", "-crf", str(VIDEO_CRF), "-v", "error", str(tmp)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=said,
                            start_new_session=True)


FFMPEG_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
"""OS errors that ffmpeg reports in its own words (``os.strerror``) when the file it writes is refused."""


def _finish_ffmpeg(ffmpeg: subprocess.Popen, said: BinaryIO) -> None:
    """Close ffmpeg's input and wait for it; OSError (with the errno ffmpeg names) if the OS refused its writes,
    RunFailed quoting ffmpeg's last line if it failed otherwise."""
    try:
        ffmpeg.stdin.close()
    except BrokenPipeError:
        pass
    code = ffmpeg.wait()
    if code == 0:
        return
    said.seek(0)
    text = said.read(1 << 16).decode("utf-8", "replace")
    for number in FFMPEG_WRITE_ERRORS:
        if os.strerror(number) in text:
            raise OSError(number, os.strerror(number))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raise RunFailed(f"ffmpeg failed (exit code {code}): {shorten(lines[-1] if lines else 'no message', 200)}")

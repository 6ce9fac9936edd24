"""Atomic file writes: a temporary file beside the target, fsync, then a rename over it.

Readers (and a run that crashes or is interrupted mid-write) see the old file or the whole new one,
never a torn one; the temporary file is removed if the write fails. Checkpoints, config copies, PNGs,
videos, meshes, metrics rewrites and the reference prior's cache are all written through here.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (ffmpeg); when the block exits
    without an exception the file written there is synced and renamed over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by extension still can.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open a binary handle whose contents replace ``path`` when the block exits without an exception."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        yield handle


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as handle:
        handle.write(data)

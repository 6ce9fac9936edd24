"""The axes mesh files are written in (both exporters' vertices go through here)."""

from __future__ import annotations

import numpy as np


def to_file_axes(vertices: np.ndarray) -> np.ndarray:
    """[V, 3] scene coordinates (z up, the object's front towards +x) -> the axes mesh files use, glTF's: +Y up,
    the front towards +Z (where viewers put their camera), +X to the right: (x, y, z) -> (y, z, x), a rotation
    (normals map the same way, winding is kept)."""
    return np.ascontiguousarray(vertices[:, [1, 2, 0]])

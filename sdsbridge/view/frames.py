"""One viewer frame: the scene rendered from a browser's camera, as rgb, depth, opacity or normals.

Rendered inside ``Scene.preview()`` under ``torch.no_grad()``, through the same ``Scene.render`` the validation grid
uses, so a frame changes nothing a run computes (training.watch). Panels as the turntable's (export/video.py,
export/shading.py): depth bright near, dark far; normals in camera space, (n + 1) / 2 over white.
"""

from __future__ import annotations

import numpy as np
import torch

from sdsbridge.common.media import to_uint8
from sdsbridge.config.schema import Config
from sdsbridge.outputs.export.shading import normal_panel, surface_normals, to_camera
from sdsbridge.outputs.export.video import depth_panel
from sdsbridge.scene.base import Scene
from sdsbridge.scene.cameras import camera_rays
from sdsbridge.view.cameras import ViewCamera, to_cameras

MODES = ("rgb", "depth", "opacity", "normal")
"""What the viewer can show (the GUI's 'show' dropdown)."""


def frame_size(side: int, aspect: float) -> tuple[int, int]:
    """(height, width) in pixels with the longer side ``side`` and width / height ``aspect`` (each >= 8)."""
    if aspect >= 1.0:
        return max(8, round(side / aspect)), side
    return side, max(8, round(side * aspect))


@torch.no_grad()
def render_frame(scene: Scene, config: Config, camera: ViewCamera, mode: str, height: int, width: int) -> np.ndarray:
    """[height, width, 3] uint8: ``mode`` (one of MODES) of the scene seen from ``camera``."""
    if mode not in MODES:
        raise ValueError(f"viewer mode must be one of {MODES}, got {mode!r}")
    cameras = to_cameras(camera, config.cameras, scene.device)
    with scene.preview():
        out = scene.render(cameras, height, width, chunk_rays=config.render.chunk_rays)
        rgb, opacity, depth = out.rgb[0], out.opacity[0], out.depth[0]
        if mode == "rgb":
            return to_uint8(rgb)
        if mode == "opacity":
            return to_uint8(opacity)
        distance = float(cameras.distance[0])
        if mode == "depth":
            return to_uint8(depth_panel(depth, opacity, max(distance - scene.radius, 0.0), distance + scene.radius))
        origins, dirs = camera_rays(cameras, height, width)
        normals = surface_normals(scene, origins[0], dirs[0], depth, opacity, scene.radius)
        return to_uint8(normal_panel(to_camera(normals, cameras.c2w[0]), opacity))

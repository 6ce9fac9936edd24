"""Between viser's cameras and ours.

viser (``CameraHandle``): ``wxyz`` is the rotation R of P_world = R p_camera + t in OpenCV axes (x right, y down,
the camera looks down +z), ``position`` is t, ``fov`` the vertical field of view in radians, ``aspect`` the canvas
width / height. Ours (``scene.cameras``): c2w in OpenGL axes (x right, y up, looking down -z), fovy in radians.
The two rotations differ by a flip of the camera's y and z axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import viser.transforms as vt

from sdsbridge.scene.cameras import CameraConfig, Cameras, view_label

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0])
"""Right-multiplying a camera rotation by this swaps OpenCV and OpenGL camera axes (its own inverse)."""


@dataclass(frozen=True)
class ViewCamera:
    """A browser's camera as the viewer renders it."""

    c2w: np.ndarray
    """[4, 4] camera-to-world, OpenGL axes, world units."""
    fovy: float
    """Vertical field of view, radians."""
    aspect: float
    """Canvas width / height."""


def from_viser(wxyz: np.ndarray, position: np.ndarray, fov: float, aspect: float) -> ViewCamera:
    """viser's camera state (module docstring) -> ViewCamera."""
    c2w = np.eye(4)
    c2w[:3, :3] = vt.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix() @ OPENCV_TO_OPENGL
    c2w[:3, 3] = np.asarray(position, dtype=np.float64)
    return ViewCamera(c2w, float(fov), float(aspect) if aspect > 0 else 1.0)


def frustum_segments(c2w: np.ndarray, fovy: np.ndarray, depth: float) -> np.ndarray:
    """Wireframe pyramids of square cameras: [N, 4, 4] OpenGL camera-to-world and [N] vertical fov (radians) ->
    [N * 8, 2, 3] world-space line segments (apex to the 4 corners of the image plane at ``depth``, then its rim)."""
    half = depth * np.tan(0.5 * np.asarray(fovy, dtype=np.float64))  # [N]
    signs = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])  # corners in order around the rim
    corners = np.concatenate([signs[None] * half[:, None, None], np.full((len(half), 4, 1), -depth)], -1)
    world = np.einsum("nij,nkj->nki", c2w[:, :3, :3], corners) + c2w[:, None, :3, 3]  # [N, 4, 3]
    apex = np.broadcast_to(c2w[:, None, :3, 3], world.shape)
    spokes = np.stack([apex, world], axis=2)  # [N, 4, 2, 3]
    rim = np.stack([world, np.roll(world, -1, axis=1)], axis=2)
    return np.concatenate([spokes, rim], axis=1).reshape(-1, 2, 3)


def to_viser(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[4, 4] OpenGL camera-to-world -> (wxyz [4], position [3]) for viser (a frustum's pose)."""
    rotation = np.asarray(c2w[:3, :3], dtype=np.float64) @ OPENCV_TO_OPENGL
    return vt.SO3.from_matrix(rotation).wxyz, np.asarray(c2w[:3, 3], dtype=np.float64)


def to_cameras(camera: ViewCamera, cfg: CameraConfig, device: torch.device) -> Cameras:
    """A batch of one of our cameras on ``device``: the ViewCamera's pose and fovy, with the elevation, azimuth,
    distance and view label its position implies (the renderer reads only c2w and fovy)."""
    x, y, z = (float(v) for v in camera.c2w[:3, 3])
    distance = math.sqrt(x * x + y * y + z * z)
    elevation = math.degrees(math.asin(z / distance)) if distance > 0 else 0.0
    azimuth = math.degrees(math.atan2(y, x))
    label = view_label(elevation, azimuth, cfg.front_half_angle, cfg.overhead_elevation)

    def one(value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.float32, device=device)

    c2w = torch.as_tensor(camera.c2w, dtype=torch.float32, device=device)[None]
    return Cameras(c2w, one(camera.fovy), one(elevation), one(azimuth), one(distance), [label])


def initial_pose(cfg: CameraConfig) -> tuple[np.ndarray, float]:
    """Where a new browser's camera starts: the first validation view (eval distance and elevation, azimuth 0, the
    object's front) as (position [3], vertical fov in radians); it looks at the origin with +z up."""
    el = math.radians(cfg.eval_elevation)
    position = cfg.eval_distance * np.array([math.cos(el), 0.0, math.sin(el)])
    return position, math.radians(cfg.eval_fovy)

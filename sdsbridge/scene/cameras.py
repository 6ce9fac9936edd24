"""Cameras: random training cameras with view labels, orbit cameras for turntables, and their rays.

World frame: z is up, the object sits at the origin, azimuth 0 looks at the object's front from +x.
Camera frame (OpenGL): the camera looks down its -z axis, +y is up, +x is right.
Angles in the public API are in degrees; ``fovy`` is stored in radians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from sdsbridge.common.devices import generator_device


@dataclass
class CameraConfig:
    """Random training cameras and the fixed evaluation orbit. Angles in degrees."""

    distance_range: list[float] = field(default_factory=lambda: [1.0, 1.5])
    """Camera distance from the origin."""
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    """Vertical field of view."""
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    """Elevation above the xy-plane; per batch, half the time uniform in angle, half the time uniform on the
    sphere (threestudio's RandomCameraIterableDataset)."""
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    """Azimuth; 0 is the front."""
    front_half_angle: float = 30.0
    """|azimuth| within this of 0 is 'front', of 180 is 'back'; otherwise 'side'."""
    overhead_elevation: float = 60.0
    """Elevation above this is 'overhead'."""
    eval_distance: float = 1.5
    """Evaluation / turntable camera distance."""
    eval_fovy: float = 70.0
    """Evaluation / turntable field of view."""
    eval_elevation: float = 15.0
    """Evaluation / turntable elevation."""
    eval_views: int = 120
    """Number of evaluation views around the orbit."""

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    """A batch of N pinhole cameras looking at the origin."""

    c2w: torch.Tensor
    """[N, 4, 4] camera-to-world matrices (OpenGL camera axes)."""
    fovy: torch.Tensor
    """[N] vertical field of view, radians."""
    elevation: torch.Tensor
    """[N] degrees above the xy-plane."""
    azimuth: torch.Tensor
    """[N] degrees, in [-180, 180)."""
    distance: torch.Tensor
    """[N] distance of the camera centre from the origin."""
    labels: list[str]
    """N view labels: 'front', 'side', 'back' or 'overhead'."""

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def positions(self) -> torch.Tensor:
        """[N, 3] camera centres in world space."""
        return self.c2w[:, :3, 3]

    def __getitem__(self, index: slice | torch.Tensor) -> "Cameras":
        """The cameras at ``index`` (a slice, or a [N] bool mask / integer index tensor) as a batch."""
        if isinstance(index, torch.Tensor):
            rows = index.nonzero().flatten() if index.dtype == torch.bool else index
            labels = [self.labels[int(i)] for i in rows.cpu()]
        else:
            labels = self.labels[index]
        return Cameras(self.c2w[index], self.fovy[index], self.elevation[index], self.azimuth[index],
                       self.distance[index], labels)

    def repeat(self, k: int) -> "Cameras":
        """The batch ``k`` times over, one copy after another (as ``Tensor.repeat`` on dim 0)."""
        return Cameras(self.c2w.repeat(k, 1, 1), self.fovy.repeat(k), self.elevation.repeat(k), self.azimuth.repeat(k),
                       self.distance.repeat(k), list(self.labels) * k)

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.elevation.to(device),
                       self.azimuth.to(device), self.distance.to(device), list(self.labels))


def view_label(elevation_deg: float, azimuth_deg: float, front_half_angle: float = 30.0,
               overhead_elevation: float = 60.0) -> str:
    """The view label of one camera: overhead above ``overhead_elevation``, front/back when |azimuth|
    is within ``front_half_angle`` of 0/180, side otherwise."""
    if elevation_deg > overhead_elevation:
        return "overhead"
    az = (azimuth_deg + 180.0) % 360.0 - 180.0
    if abs(az) < front_half_angle:
        return "front"
    if abs(az) > 180.0 - front_half_angle:
        return "back"
    return "side"


def look_at_origin(position: torch.Tensor) -> torch.Tensor:
    """[N, 3] camera centres -> [N, 4, 4] camera-to-world matrices looking at the origin, z up."""
    forward = -position / position.norm(dim=-1, keepdim=True)
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, world_up, dim=-1)
    # Straight up/down: any right vector works; pick +y so the matrix stays orthonormal.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype,
                                                 device=position.device).expand_as(right), right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def cameras_from_angles(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor,
                        fovy_deg: torch.Tensor, cfg: Optional[CameraConfig] = None) -> Cameras:
    """Build cameras from [N] elevation/azimuth/fovy (degrees) and distance."""
    cfg = cfg or CameraConfig()
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    position = torch.stack([distance * torch.cos(el) * torch.cos(az),
                            distance * torch.cos(el) * torch.sin(az),
                            distance * torch.sin(el)], dim=-1)
    labels = [view_label(float(e), float(a), cfg.front_half_angle, cfg.overhead_elevation)
              for e, a in zip(elevation.tolist(), azimuth.tolist())]
    azimuth_wrapped = (azimuth + 180.0) % 360.0 - 180.0
    return Cameras(look_at_origin(position), torch.deg2rad(fovy_deg), elevation, azimuth_wrapped, distance, labels)


def _uniform(n: int, bounds: list[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=generator, device=generator_device(generator))


def sample_elevation(bounds: list[float], n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[n] elevations in degrees within ``bounds`` = [low, high], as threestudio's training cameras: one coin
    per batch picks either uniform in angle, or "uniform on the sphere" in threestudio's form, where
    sin(elevation) is uniform between low / 90 and high / 90 (their inverse-transform sampling maps the
    range linearly to [-1, 1] before the arcsine; for [-10, 45] that is [-6.4, 30] degrees)."""
    if torch.rand((), generator=generator, device=generator_device(generator)) < 0.5:  # (on the CPU: no device sync)
        return _uniform(n, bounds, generator)
    sine = _uniform(n, [bounds[0] / 90.0, bounds[1] / 90.0], generator)
    return torch.rad2deg(torch.asin(sine))


def sample_cameras(cfg: CameraConfig, n: int, generator: Optional[torch.Generator] = None) -> Cameras:
    """N random training cameras from the configured ranges (on the CPU; use ``.to(device)``).

    Elevation as ``sample_elevation``; azimuth, distance and fovy uniformly.
    """
    elevation = sample_elevation(cfg.elevation_range, n, generator)
    azimuth = _uniform(n, cfg.azimuth_range, generator)
    distance = _uniform(n, cfg.distance_range, generator)
    fovy = _uniform(n, cfg.fovy_range, generator)
    return cameras_from_angles(elevation, azimuth, distance, fovy, cfg)


def orbit_cameras(cfg: CameraConfig, n_views: Optional[int] = None) -> Cameras:
    """Evaluation / turntable cameras: ``n_views`` (default cfg.eval_views) evenly spaced azimuths,
    starting at the front, at the eval elevation, distance and fovy."""
    n = n_views or cfg.eval_views
    cpu = torch.device("cpu")
    azimuth = torch.arange(n, dtype=torch.float32, device=cpu) * (360.0 / n)
    return cameras_from_angles(torch.full((n,), float(cfg.eval_elevation), device=cpu), azimuth,
                               torch.full((n,), float(cfg.eval_distance), device=cpu),
                               torch.full((n,), float(cfg.eval_fovy), device=cpu), cfg)


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres.

    Returns (origins, directions), each [N, H, W, 3] in world space, directions unit length.
    Pixel (0, 0) is the top-left corner of the image.
    """
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    j, i = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                          torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [N], in pixels
    x = (i[None] - 0.5 * width) / focal[:, None, None]
    y = -(j[None] - 0.5 * height) / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [N, H, W, 3]
    rotation = cameras.c2w[:, :3, :3]
    dirs = torch.einsum("nij,nhwj->nhwi", rotation, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def fovy_to_focal(fovy_rad: float, height: int) -> float:
    """Focal length in pixels for a vertical field of view."""
    return 0.5 * height / math.tan(0.5 * fovy_rad)

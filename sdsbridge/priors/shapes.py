"""Built-in shapes (analytic signed distance functions with a colour) and their sphere-traced renderer.

These are the ground truth of the reference prior: its image sets are renders of these shapes, and a
run's result is scored against them (PSNR of renders, Chamfer distance to the SDF surface).

World frame as in cameras.py: z is up, the front faces +x. All shapes are centred at the origin and fit
in a sphere of radius ``Shape.bound`` (<= 0.6) inside the radius-1 scene. Lengths are in scene units.
Shading is Lambert from one fixed world-space light plus ambient, so it does not depend on the view and
a NeRF's view-independent colour can reproduce it. The background is white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sdsbridge.scene.cameras import Cameras, camera_rays

LIGHT_DIRECTION = (0.6, 0.4, 1.0)
"""Direction towards the light in world space (normalised when used): front-right, from above."""
AMBIENT = 0.3
"""Shade = albedo * (AMBIENT + (1 - AMBIENT) * max(0, n . light))."""
HIT_EPSILON = 5e-4
"""A ray has hit the surface once the SDF at its point is below this (scene units)."""
MAX_STEPS = 96
"""Sphere-tracing iterations; rays still marching after this count as hits if within GRAZE_EPSILON."""
GRAZE_EPSILON = 5e-3


def _torus(p: torch.Tensor, major: float = 0.4, minor: float = 0.15) -> torch.Tensor:
    """Torus in the xy-plane (hole along z)."""
    ring = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - major
    return torch.sqrt(ring ** 2 + p[:, 2] ** 2) - minor


def _rounded_box(p: torch.Tensor, half: tuple[float, float, float] = (0.25, 0.4, 0.3),
                 rounding: float = 0.03) -> torch.Tensor:
    """Axis-aligned box with rounded edges; outer half extents ``half``."""
    q = p.abs() - torch.tensor(half, dtype=p.dtype, device=p.device) + rounding
    outside = q.clamp(min=0.0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp(max=0.0)
    return outside + inside - rounding


def _capsule(p: torch.Tensor, half_length: float = 0.25, radius: float = 0.2) -> torch.Tensor:
    """Upright capsule: a segment on the z axis from -half_length to +half_length, thickened by radius."""
    z = p[:, 2].clamp(-half_length, half_length)
    return torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + (p[:, 2] - z) ** 2) - radius


def _octahedron(p: torch.Tensor, size: float = 0.5) -> torch.Tensor:
    """Regular octahedron with vertices at +-size on the axes (exact distance outside)."""
    a = p.abs()
    m = a.sum(dim=-1) - size
    # Distance to the nearest edge region, cycling the axes so the smallest-enough one comes first.
    q = torch.where((3.0 * a[:, 0] < m)[:, None], a,
                    torch.where((3.0 * a[:, 1] < m)[:, None], a.roll(-1, dims=1), a.roll(1, dims=1)))
    k = (0.5 * (q[:, 2] - q[:, 1] + size)).clamp(0.0, size)
    edge = torch.stack([q[:, 0], q[:, 1] - size + k, q[:, 2] - k], dim=-1).norm(dim=-1)
    near_face = (3.0 * a >= m[:, None]).all(dim=-1)
    return torch.where(near_face, m / math.sqrt(3.0), edge)


@dataclass(frozen=True)
class Shape:
    """A built-in shape: ``sdf`` maps [N, 3] points to [N] signed distances (negative inside)."""

    name: str
    colour: str
    albedo: tuple[float, float, float]
    sdf: Callable[[torch.Tensor], torch.Tensor]
    bound: float
    """Radius of a sphere around the origin that contains the shape."""
    params: str
    """Everything that defines the geometry, for cache keys."""

    @property
    def description(self) -> str:
        return f"a {self.colour} {self.name}"


SHAPES: dict[str, Shape] = {
    s.name: s for s in (
        Shape("torus", "red", (0.85, 0.12, 0.1), _torus, 0.6, "torus R=0.4 r=0.15 z-axis"),
        Shape("box", "blue", (0.12, 0.3, 0.9), _rounded_box, 0.6, "box half=(0.25,0.4,0.3) round=0.03"),
        Shape("capsule", "yellow", (0.95, 0.8, 0.12), _capsule, 0.5, "capsule z+-0.25 r=0.2"),
        Shape("octahedron", "green", (0.15, 0.7, 0.25), _octahedron, 0.55, "octahedron s=0.5"),
    )
}
"""The built-in shapes by name."""


def get_shape(name: str) -> Shape:
    """Look up a built-in shape by name (KeyError names the available ones)."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape '{name}' (available: {', '.join(SHAPES)})")
    return SHAPES[name]


def sdf_normals(sdf: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    """[N, 3] points -> [N, 3] unit normals (SDF gradient by a tetrahedral finite difference)."""
    k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=p.dtype, device=p.device)
    grad = sum(k[i] * sdf(p + h * k[i])[:, None] for i in range(4))
    return F.normalize(grad, dim=-1)


def sphere_trace(sdf: Callable[[torch.Tensor], torch.Tensor], origins: torch.Tensor, directions: torch.Tensor,
                 bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """March [N, 3] rays (unit directions) against an SDF inside the sphere of radius ``bound``.

    Returns (hit [N] bool, points [N, 3]: the surface point where hit, undefined elsewhere).
    """
    n = origins.shape[0]
    # Entry/exit of the bounding sphere: |o + t d|^2 = bound^2.
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - bound ** 2
    disc = b * b - c
    inside = disc > 0
    root = torch.sqrt(disc.clamp(min=0.0))
    t = (-b - root).clamp(min=0.0)
    t_far = -b + root
    hit = torch.zeros(n, dtype=torch.bool, device=origins.device)
    active = torch.nonzero(inside).squeeze(1)
    # One [n, 8] state (origin, direction, t, t_far) so compaction is a single gather per step.
    state = torch.cat([origins[active], directions[active], t[active, None], t_far[active, None]], dim=1)
    dist = torch.full_like(state[:, 0], float("inf"))
    frozen = torch.zeros_like(state[:, 0], dtype=torch.bool)
    for _ in range(MAX_STEPS):
        if active.numel() == 0:
            break
        dist = torch.where(frozen, dist, sdf(torch.addcmul(state[:, 0:3], state[:, 6:7], state[:, 3:6])))
        state[:, 6] += dist.masked_fill(frozen, 0.0)
        frozen |= (dist < HIT_EPSILON) | (state[:, 6] > state[:, 7])
        # Finished rays are frozen in place and dropped only once they are a quarter of the batch: the
        # boolean indexing of a compaction costs more than an SDF evaluation.
        if 4 * int(frozen.sum()) > active.numel():
            hit[active[frozen & (dist < HIT_EPSILON)]] = True
            t[active[frozen]] = state[frozen, 6]
            keep = ~frozen
            active, state, dist, frozen = active[keep], state[keep], dist[keep], frozen[keep]
    if active.numel():  # finished since the last compaction, or (grazing rays) out of steps
        t[active] = state[:, 6]
        hit[active[dist < torch.where(frozen, HIT_EPSILON, GRAZE_EPSILON)]] = True
    return hit, origins + t[:, None] * directions


def shade(shape: Shape, points: torch.Tensor) -> torch.Tensor:
    """[N, 3] surface points -> [N, 3] Lambert + ambient colours in [0, 1]."""
    normals = sdf_normals(shape.sdf, points)
    light = F.normalize(torch.tensor(LIGHT_DIRECTION, dtype=points.dtype, device=points.device), dim=0)
    lambert = (normals @ light).clamp(min=0.0)
    albedo = torch.tensor(shape.albedo, dtype=points.dtype, device=points.device)
    return albedo * (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]


@torch.no_grad()
def render_shape(shape: Shape | str, cameras: Cameras, resolution: int, supersample: int = 1,
                 chunk_rays: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a shape over a white background.

    ``supersample`` s renders s*s rays per pixel and averages them (anti-aliasing; costs s^2).
    Returns (rgb [N, 3, R, R] in [0, 1], mask [N, 1, R, R] in [0, 1]: the covered fraction of each pixel).
    """
    shape = get_shape(shape) if isinstance(shape, str) else shape
    size = resolution * supersample
    n = len(cameras)
    views_per_chunk = max(1, chunk_rays // (size * size))
    rgb_chunks, mask_chunks = [], []
    for start in range(0, n, views_per_chunk):
        cams = Cameras(*(x[start:start + views_per_chunk] for x in
                         (cameras.c2w, cameras.fovy, cameras.elevation, cameras.azimuth, cameras.distance)),
                       cameras.labels[start:start + views_per_chunk])
        origins, directions = camera_rays(cams, size, size)
        m = origins.shape[0]
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        hit, points = sphere_trace(shape.sdf, origins, directions, shape.bound)
        rgb = torch.ones_like(origins)
        rgb[hit] = shade(shape, points[hit])
        rgb = rgb.reshape(m, size, size, 3).permute(0, 3, 1, 2)
        mask = hit.to(origins.dtype).reshape(m, 1, size, size)
        if supersample > 1:
            rgb, mask = F.avg_pool2d(rgb, supersample), F.avg_pool2d(mask, supersample)
        rgb_chunks.append(rgb)
        mask_chunks.append(mask)
    return torch.cat(rgb_chunks).contiguous(), torch.cat(mask_chunks).contiguous()

"""Score a trained run: against the built-in shape's ground truth for reference-prior runs, basic statistics
for Stable Diffusion runs (which have no ground truth).

Reference-prior scores (the metrics are in scores.py):
- psnr_db: PSNR of the NeRF's renders over white (rgb_fg + (1 - opacity) * 1) against the shape's own
  anti-aliased renders over white, on ``n_views`` eval-orbit cameras (eval elevation / distance / fovy,
  azimuths from 0 in equal steps) -- not the prior's reference cameras; the NeRF's renders are anti-aliased the
  same way (``SUPERSAMPLE`` rays per pixel and axis, box-filtered);
- chamfer: symmetric Chamfer distance (scene units) of the mesh extracted with the run's export threshold
  (auto by default) to the shape's SDF surface; inf when no mesh can be extracted (see mesh_error);
- saturation_error: |mean HSV saturation of renders - of the truth| over the shape's pixel coverage;
- mask_iou: soft IoU of rendered opacity and the shape's coverage;
- normal_error_deg: mean angle between the rendered surface's normals (``shading.surface_normals``, averaged
  over each pixel's sub-pixels) and the shape's true normals, over the pixels where both have a surface.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from sdsbridge.outputs import scores
from sdsbridge.outputs.export.shading import surface_normals
from sdsbridge.scene.cameras import camera_rays, orbit_cameras
from sdsbridge.common.devices import fitted_cpu_threads
from sdsbridge.common.errors import UserError
from sdsbridge.outputs.export.mesh import extract_mesh
from sdsbridge.priors.reference import SUPERSAMPLE
from sdsbridge.training.checkpoint import load_trained_scene
from sdsbridge.training.step import normal_step

logger = logging.getLogger("sdsbridge")

DEFAULT_VIEWS = 16
"""Eval-orbit views scored by default."""
DEFAULT_MESH_RESOLUTION = 128
"""Marching-cubes grid for the Chamfer distance (voxel 0.016 at radius 1, well below the 0.05 target)."""


def _mesh_stats(scene, config, mesh_resolution: int) -> tuple[Optional[object], dict]:
    """Extract the run's mesh; (MeshResult or None, metadata: threshold, faces, vertices, mesh_error)."""
    try:
        mesh = extract_mesh(scene, scene.radius, mesh_resolution, config.export.threshold,
                            min_component_fraction=config.export.min_component_fraction)
    except UserError as exc:
        return None, {"threshold": None, "mesh_faces": 0, "mesh_vertices": 0, "mesh_error": str(exc)}
    return mesh, {"threshold": mesh.threshold_used, "mesh_faces": int(mesh.faces.shape[0]),
                  "mesh_vertices": int(mesh.vertices.shape[0])}


@torch.no_grad()
def _render_white(scene, config, n_views: int, resolution: int, device: torch.device):
    """[N, 3, R, R] renders over white, [N, 1, R, R] opacity (on the CPU), the eval cameras and the normals of
    the rendered surface ([N, R, R, 3] world space, 0 where no sub-pixel has opacity >= ``MIN_OPACITY``;
    ``surface_normals``). Rendered at ``SUPERSAMPLE`` x ``resolution`` and box-filtered down, as the truth is
    (``scores.reference_views``): one ray per pixel would score even the true shape's edges as errors."""
    cameras = orbit_cameras(config.cameras, n_views)
    size = resolution * SUPERSAMPLE
    was_training = scene.training
    scene.eval()
    try:
        out = scene.render(cameras.to(device), size, size,
                           background_color=torch.ones(3, device=device), chunk_rays=config.render.chunk_rays)
    finally:
        scene.train(was_training)
    origins, dirs = camera_rays(cameras.to(device), size, size)
    step = normal_step(config, scene.radius)
    normals = torch.stack([surface_normals(scene, origins[v], dirs[v], out.depth[v], out.opacity[v], step)
                           for v in range(len(cameras))]).float().cpu()
    pool = lambda images: F.avg_pool2d(images.float().cpu(), SUPERSAMPLE)  # [N, C, size, size] -> [N, C, R, R]
    normals = F.normalize(pool(normals.permute(0, 3, 1, 2)), dim=1).permute(0, 2, 3, 1)  # mean direction
    return pool(out.rgb.permute(0, 3, 1, 2).clamp(0, 1)), pool(out.opacity.permute(0, 3, 1, 2)), cameras, normals


def evaluate_run(run_dir: Path, device: Union[torch.device, str] = "cpu", n_views: int = DEFAULT_VIEWS,
                 resolution: Optional[int] = None, mesh_resolution: int = DEFAULT_MESH_RESOLUTION,
                 n_points: int = 20000) -> dict:
    """Evaluate a trained run (a run directory or a checkpoint file): ``evaluate_scene`` of its last
    checkpoint. Arguments and result as there."""
    device = torch.device(device)
    scene, config, step = load_trained_scene(Path(run_dir), device)
    scene.prepare_for_points(mesh_resolution ** 3)  # the renders are small: eager is faster for them (measured)
    with fitted_cpu_threads(device):
        return evaluate_scene(scene, config, step, device, n_views, resolution, mesh_resolution, n_points)


def evaluate_scene(scene, config, step: int, device: Union[torch.device, str] = "cpu",
                   n_views: int = DEFAULT_VIEWS, resolution: Optional[int] = None,
                   mesh_resolution: int = DEFAULT_MESH_RESOLUTION, n_points: int = 20000) -> dict:
    """Evaluate a scene (``field`` + ``renderer``, e.g. ``scene.Scene``) trained with ``config``.

    Args:
        n_views: eval-orbit views to render and score.
        resolution: render size in pixels (default: the reference prior's ``prior.resolution``, else 64).
        mesh_resolution: marching-cubes grid for the mesh statistics.
        n_points: surface samples per side of the Chamfer distance.

    Returns a JSON-ready dict. Always: prior, prompt, step, scored (bool), n_views, resolution,
    mesh_resolution, mean_opacity, threshold, mesh_faces, mesh_vertices (+ mesh_error when no mesh could be
    extracted), seconds. Reference-prior runs add shape, psnr_db, chamfer, saturation_error, mask_iou, normal_error_deg
    (module docstring); other runs add ``reason``: why they cannot be scored.
    """
    started = time.time()
    device = torch.device(device)
    reference = config.prior.kind == "reference"
    resolution = resolution or (config.prior.resolution if reference else 64)
    if reference:
        shape = scores.shape_for_prompt(config.prompt)  # UserError before any rendering if unscorable
    rgb, opacity, cameras, normals = _render_white(scene, config, n_views, resolution, device)
    mesh, mesh_meta = _mesh_stats(scene, config, mesh_resolution)
    result = {"prior": config.prior.kind, "prompt": config.prompt, "step": step, "scored": reference,
              "n_views": n_views, "resolution": resolution, "mesh_resolution": mesh_resolution,
              "mean_opacity": float(opacity.mean()), **mesh_meta}
    if reference:
        truth, coverage = scores.reference_views(shape, cameras, resolution)
        chamfer = math.inf if mesh is None else scores.chamfer_distance(
            torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces), shape, n_points=n_points)
        union = float(torch.maximum(opacity, coverage).sum())
        true_hit, true_normals = scores.true_normals(shape, cameras, resolution)
        both = true_hit & (normals.norm(dim=-1) > 0)  # pixels where the truth and the render have a surface
        result.update({"shape": shape, "psnr_db": scores.psnr(rgb, truth), "chamfer": chamfer,
                       "saturation_error": scores.saturation_error(rgb, truth, coverage),
                       "mask_iou": float(torch.minimum(opacity, coverage).sum()) / union if union else 0.0,
                       "normal_error_deg": scores.normal_error_deg(normals[both], true_normals[both])})
    else:
        result["reason"] = (f"no ground truth for a {config.prior.kind} prior: PSNR, Chamfer and saturation "
                            "are scored only for prior.kind=reference runs")
    result["seconds"] = round(time.time() - started, 2)
    logger.debug("eval: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in result.items() if k not in ("prompt", "mesh_error", "reason")))
    return result

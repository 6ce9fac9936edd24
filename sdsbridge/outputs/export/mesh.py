"""Mesh export: density on a grid -> marching cubes -> vertex colours -> glb / obj / ply.

Grid convention: ``resolution`` samples per axis at the cell *corners* ``x_i = -radius + i * h``,
``h = 2 radius / (resolution - 1)``, i = 0..resolution-1, so the outermost samples lie on the cube's faces.
Density is taken as 0 outside the scene sphere of ``radius`` (the renderer never samples there, so the
field is untrained there) and the grid is padded by one zero layer before marching cubes, so every
surface closes. A marching-cubes vertex at index coordinate v of the padded grid is at
``-radius + (v - 1) * h`` in world units.

Automatic level (``threshold="auto"``), in three steps:
1. split: Otsu's threshold on log10(max(density, 1e-3)) over the grid points inside the sphere, which
   separates the background mode from the high-density (object) mode;
2. level = AUTO_LEVEL (5, the best level measured on trained demo runs' softplus density; 25 gave empty
   meshes);
3. clamped into [split, half the 90th percentile of the densities above the split] so it lies above the
   background and well inside the object's range when the field's scale differs from the demo's (when
   the two bounds cross, the split wins).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import mcubes
import numpy as np
import torch
import trimesh

from sdsbridge.common.atomic import atomic_write_bytes, remove_stale_temps
from sdsbridge.training.checkpoint import find_checkpoint, run_dir_of
from sdsbridge.outputs.export.axes import to_file_axes
from sdsbridge.common.devices import fitted_cpu_threads
from sdsbridge.common.errors import UserError
from sdsbridge.common.targets import check_new_files
from sdsbridge.outputs.naming import output_name
from sdsbridge.scene.base import Scene
from sdsbridge.training.checkpoint import load_trained_scene

logger = logging.getLogger("sdsbridge")

AUTO_LEVEL = 5.0
"""Preferred iso-level of the softplus density (measured on the demo: ~5 is best, 25 gave empty meshes)."""
LOG_FLOOR = 1e-3
"""Densities below this count as this in the log histogram of the automatic level."""
FORMATS = ("glb", "obj", "ply")
TEXTURED_FILES = ("glb", "obj", "mtl", "png")
"""The files of a textured mesh (texture.py's ``save_textured``), one stem."""


@dataclass
class MeshResult:
    """A coloured triangle mesh in world units."""

    vertices: np.ndarray
    """[V, 3] float32 world positions."""
    faces: np.ndarray
    """[F, 3] int64 vertex indices, counter-clockwise seen from outside (normals point out)."""
    vertex_colors: np.ndarray
    """[V, 3] uint8 RGB from the field's colour head at the vertices."""
    threshold_used: float
    """The density level of the surface."""
    density_range: tuple[float, float]
    """(min, max) density over the grid points inside the scene sphere."""


def sphere_mask(radius: float, resolution: int) -> np.ndarray:
    """[R, R, R] bool: the corner-grid points inside the closed scene sphere of ``radius``."""
    squared = np.linspace(-radius, radius, resolution) ** 2
    return squared[:, None, None] + squared[None, :, None] + squared[None, None, :] <= radius ** 2 * (1 + 1e-9)


@torch.no_grad()
def density_grid(field: Scene, radius: float, resolution: int, chunk: int = 2 ** 18) -> np.ndarray:
    """Density on the corner grid over [-radius, radius]^3 (see the module docstring).

    ``field.density`` (the scene contract's: [M, 3] world points -> [M], on ``field.device``) is called on at most ``chunk`` points at a time and only
    on points inside the sphere of ``radius`` (``sphere_mask``); the others are 0.
    Returns [R, R, R] float32, axes (x, y, z).
    """
    if resolution < 2:
        raise UserError(f"mesh resolution must be at least 2, got {resolution}")
    device = field.device
    axis = torch.linspace(-radius, radius, resolution, dtype=torch.float64)
    inside = torch.from_numpy(sphere_mask(radius, resolution).reshape(-1))
    grid = np.zeros(resolution ** 3, dtype=np.float32)
    total = resolution ** 3
    for start in range(0, total, chunk):
        idx = torch.arange(start, min(start + chunk, total))
        idx = idx[inside[idx]]
        if idx.numel() == 0:
            continue
        i, j, k = idx // (resolution * resolution), (idx // resolution) % resolution, idx % resolution
        points = torch.stack([axis[i], axis[j], axis[k]], dim=-1).to(device=device, dtype=torch.float32)
        grid[idx.numpy()] = field.density(points).float().cpu().numpy()
    return grid.reshape(resolution, resolution, resolution)


def _otsu(values: np.ndarray, bins: int = 256) -> Optional[float]:
    """Otsu's threshold of 1-D ``values``: maximises the between-class variance. None when constant."""
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return None
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def auto_threshold(densities: np.ndarray) -> Optional[float]:
    """The automatic iso-level of a set of densities (the rule in the module docstring); None when the
    densities hold no foreground (constant, or nothing above the background)."""
    split_log = _otsu(np.log10(np.maximum(densities, LOG_FLOOR)))
    if split_log is None:
        return None
    split = 10.0 ** split_log
    foreground = densities[densities > split]
    if foreground.size == 0:
        return None
    upper = 0.5 * float(np.percentile(foreground, 90))
    return float(max(min(AUTO_LEVEL, upper), split))


def _face_components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """[F] component label of each face (faces sharing a vertex are connected): scipy's connected components
    of the vertex graph, read at each face's first vertex."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(n_vertices, n_vertices))
    _, labels = connected_components(graph, directed=False)
    return labels[faces[:, 0]]


def remove_small_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float
                            ) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop connected components with fewer faces than ``min_fraction`` x the largest one's.

    Returns (vertices [V', 3], faces [F', 3] re-indexed, number of components removed).
    """
    if min_fraction <= 0 or faces.shape[0] == 0:
        return vertices, faces, 0
    _, component, counts = np.unique(_face_components(faces, vertices.shape[0]), return_inverse=True,
                                     return_counts=True)
    keep_component = counts >= min_fraction * counts.max()
    faces = faces[keep_component[component]]
    used = np.unique(faces)
    remap = np.full(vertices.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return vertices[used], remap[faces], int((~keep_component).sum())


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast-simplification) of [V, 3] vertices and [F, 3] faces to about
    ``target_faces`` faces; returns (vertices [V', 3] float32, faces [F', 3] int64)."""
    import fast_simplification

    points, triangles = fast_simplification.simplify(np.ascontiguousarray(vertices, dtype=np.float64),
                                                     np.ascontiguousarray(faces, dtype=np.int32),
                                                     target_count=int(target_faces))
    return np.asarray(points, dtype=np.float32), np.asarray(triangles, dtype=np.int64)


@torch.no_grad()
def vertex_colors(field: Scene, vertices: np.ndarray, chunk: int = 2 ** 18) -> np.ndarray:
    """[V, 3] world points -> [V, 3] uint8 colours from ``field.colour`` (rgb in [0, 1])."""
    points = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32))
    colors = [field.colour(part.to(field.device)).float().clamp(0, 1).cpu() for part in points.split(chunk)]
    rgb = torch.cat(colors) if colors else torch.zeros(0, 3)
    return (rgb.numpy() * 255.0 + 0.5).astype(np.uint8)


def _suggest(densities: np.ndarray) -> str:
    level = auto_threshold(densities)
    return f"{level:.3g}" if level is not None else "none (the field holds no object; is the run trained?)"


def extract_mesh(field: Scene, radius: float, resolution: int = 256,
                 threshold: Union[str, float] = "auto", chunk: int = 2 ** 18,
                 min_component_fraction: float = 0.05, decimate_faces: int = 0) -> MeshResult:
    """Marching-cubes mesh of ``field`` (a ``Scene``, or anything with its ``density``, ``colour`` and ``device``)
    over the scene cube [-radius, radius]^3 at ``resolution``^3 grid points.

    Args:
        threshold: density level of the surface (a number or numeric string), or "auto" (module docstring).
        chunk: points per field call (bounds memory: 256^3 runs in ~0.5 GB on the CPU).
        min_component_fraction: drop components with fewer faces than this fraction of the largest.
        decimate_faces: target face count (0 = keep all), by quadric decimation.

    Raises UserError (one line, with the density range and a suggested level) when the level gives no
    surface.
    """
    started = time.time()
    grid = density_grid(field, radius, resolution, chunk)
    densities = grid[sphere_mask(radius, resolution)]
    density_range = (float(densities.min()), float(densities.max()))
    where = f"grid density range [{density_range[0]:.3g}, {density_range[1]:.3g}]"
    if threshold == "auto":
        level = auto_threshold(densities)
        if level is None:
            raise UserError(f"mesh: the density is uniform over the scene, nothing to mesh ({where}); "
                            "is the run trained?")
    else:
        try:
            level = float(threshold)  # numbers, and numeric strings from the command line
        except (TypeError, ValueError):
            raise UserError(f"mesh threshold must be 'auto' or a number, got {threshold!r}") from None
    if not density_range[0] < level < density_range[1]:
        raise UserError(f"mesh: no surface at density level {level:.3g} ({where}); "
                        f"suggested threshold: {_suggest(densities)}")

    vertices, faces = mcubes.marching_cubes(np.pad(grid, 1).astype(np.float64), level)
    step = 2.0 * radius / (resolution - 1)
    vertices = (-radius + (vertices - 1.0) * step).astype(np.float32)
    faces = faces.astype(np.int64)
    vertices, faces, removed = remove_small_components(vertices, faces, min_component_fraction)
    if decimate_faces and faces.shape[0] > decimate_faces:
        vertices, faces = decimate(vertices, faces, decimate_faces)
    if faces.shape[0] < 4:
        raise UserError(f"mesh: degenerate surface ({faces.shape[0]} faces) at density level {level:.3g} "
                        f"({where}); suggested threshold: {_suggest(densities)}")
    if trimesh.Trimesh(vertices, faces, process=False).volume < 0:  # keep normals pointing out
        faces = faces[:, ::-1].copy()
    colors = vertex_colors(field, vertices, chunk)
    logger.info("mesh: level %.3g (%s; %s), %d vertices, %d faces, %d small component(s) removed, "
                "%d^3 grid in %.1f s", level, "auto" if threshold == "auto" else "given", where,
                vertices.shape[0], faces.shape[0], removed, resolution, time.time() - started)
    return MeshResult(vertices, faces, colors, level, density_range)


def save_mesh(result: MeshResult, path: Path, format: Optional[str] = None) -> Path:
    """Write a mesh with vertex colours as glb, obj (colours as 'v x y z r g b', which trimesh reloads)
    or ply (binary), atomically: a temporary file in the same directory, then a rename over ``path``.
    Positions are in file axes (``to_file_axes``: Y up, front towards +Z).

    ``format`` defaults to the file suffix. Returns ``path``.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise UserError(f"mesh format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rgba = np.concatenate([result.vertex_colors, np.full((result.vertex_colors.shape[0], 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(to_file_axes(result.vertices), result.faces, vertex_colors=rgba, process=False)
    data = mesh.export(file_type=fmt, include_color=True) if fmt == "obj" else mesh.export(file_type=fmt)
    data = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write_bytes(path, data)
    return path


def mesh_path(config, run_dir: Path, step: int, fmt: str, resolution: Optional[int], threshold,
              textured: bool, texture_size: Optional[int]) -> Path:
    """``<run_dir>/mesh/mesh-step<step>[-tags].<fmt>`` (outputs.py): tagged with the settings that differ from
    ``config.export`` (resolution 'res128', threshold 'level2.5', texture size 'tex512') and 'textured' for
    a textured mesh (its .glb would otherwise take the plain one's name)."""
    export = config.export
    tags = []
    if resolution is not None and resolution != export.resolution:
        tags.append(f"res{resolution}")
    if threshold is not None and str(threshold) != str(export.threshold):
        tags.append("auto" if threshold == "auto" else f"level{float(threshold):g}")
    if textured:
        tags.append("textured")
        if texture_size is not None and texture_size != export.texture_size:
            tags.append(f"tex{texture_size}")
    return Path(run_dir) / "mesh" / output_name("mesh", step, tags, f".{fmt}")


def export_mesh(scene, config, run_dir: Path, step: int, format: Optional[str] = None,
                resolution: Optional[int] = None, threshold: Union[str, float, None] = None,
                texture: Optional[bool] = None, texture_size: Optional[int] = None, out: Optional[Path] = None,
                replace: bool = True) -> Path:
    """Extract the mesh of a trained scene (a ``Scene``) at training step
    ``step`` and save it as ``out``, else as ``mesh_path`` (``<run_dir>/mesh/mesh-step<step>[-tags].<format>``);
    with ``texture`` as that .glb plus .obj / .mtl / .png of the same stem (texture.py), all four or none. Unset
    arguments come from ``config.export`` (format glb, resolution 256, threshold auto, texture off, 1024 texels).
    ``replace`` false: UserError, before any work, when one of those files exists (common/targets.py). Returns the
    path (the .glb of a textured mesh)."""
    export = config.export
    fmt = (format or (Path(out).suffix.lstrip(".") if out is not None and not texture else "") or export.format).lower()
    if fmt not in FORMATS:
        raise UserError(f"mesh format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    textured = export.texture if texture is None else texture
    if textured:
        fmt = "glb"
    path = Path(out) if out is not None else mesh_path(config, run_dir, step, fmt, resolution, threshold, textured,
                                                       texture_size)
    targets = [path.with_name(f"{path.stem}.{ext}") for ext in TEXTURED_FILES] if textured else [path]
    check_new_files(targets, "--out" if out is not None else "export", force=replace)
    result = extract_mesh(scene, scene.radius, resolution or export.resolution,
                          export.threshold if threshold is None else threshold,
                          min_component_fraction=export.min_component_fraction,
                          decimate_faces=export.decimate_faces)
    if not textured:
        return save_mesh(result, path, fmt)
    from sdsbridge.outputs.export.texture import bake_texture, save_textured  # (xatlas and the baking: only when textured)

    vertices, faces = result.vertices, result.faces
    if export.texture_faces and faces.shape[0] > export.texture_faces:
        vertices, faces = decimate(vertices, faces, export.texture_faces)
    baked = bake_texture(scene, vertices, faces, texture_size or export.texture_size)
    return save_textured(baked, path.parent, path.stem)[0]


def export_run_mesh(run_dir: Path, format: Optional[str] = None, resolution: Optional[int] = None,
                    threshold: Union[str, float, None] = None, device: Union[torch.device, str] = "cpu",
                    texture: Optional[bool] = None, texture_size: Optional[int] = None,
                    out: Optional[Path] = None, force: bool = False) -> Path:
    """``export_mesh`` of a run's newest checkpoint (``run_dir``: a run directory or a checkpoint file); writes
    ``out``, else ``<run_dir>/mesh/mesh-step<step>[-tags].<format>`` (``mesh_path``), never replacing the
    outputs of other steps or settings, nor an existing file of the same name unless ``force``."""
    checkpoint = find_checkpoint(Path(run_dir))
    remove_stale_temps(run_dir_of(checkpoint))  # left by a killed write
    scene, config, step = load_trained_scene(Path(run_dir), torch.device(device))
    scene.prepare_for_points((resolution or config.export.resolution) ** 3)
    with fitted_cpu_threads(torch.device(device)):
        return export_mesh(scene, config, run_dir_of(checkpoint), step, format, resolution, threshold, texture,
                           texture_size, out, replace=force)

"""Textured mesh: UV atlas (xatlas) -> base-colour texture baked from the field -> glb (PBR base colour) and
obj + mtl + png.

Texture convention (trimesh's and OBJ's): uv in [0, 1]^2 with v pointing up, so texel (row r, column c) of an
S x S image has its centre at u = (c + 0.5) / S, v = 1 - (r + 0.5) / S; trimesh flips v when it writes glTF
(whose image origin is the top-left corner).

Baking: every texel whose centre lies inside a UV triangle gets the field's colour at the 3D point with the
same barycentric coordinates on that triangle (a point on the marching-cubes surface). The atlas charts are
then dilated by ``DILATE_TEXELS`` texels (each empty texel next to filled ones takes their mean), so bilinear
filtering and mip-maps at chart edges read the chart's colour, not the empty atlas: no seams.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
import xatlas
from PIL import Image

from sdsbridge.common.atomic import atomic_write_files
from sdsbridge.scene.base import Scene
from sdsbridge.outputs.export.axes import to_file_axes
from sdsbridge.common.errors import UserError

logger = logging.getLogger("sdsbridge")

ATLAS_PADDING = 4
"""Texels between charts in the atlas (xatlas ``PackOptions.padding``)."""
DILATE_TEXELS = 8
"""Charts grow by this many texels into the empty atlas after baking."""
MAX_CANDIDATES = 1 << 22
"""Rasteriser memory bound: (triangle, texel) pairs tested at a time."""


@dataclass
class TexturedMesh:
    """A mesh with a UV atlas and its base-colour texture, in world units."""

    vertices: np.ndarray
    """[V, 3] float32 positions (vertices on atlas seams are duplicated, one copy per chart)."""
    faces: np.ndarray
    """[F, 3] int64 vertex indices, counter-clockwise seen from outside."""
    uv: np.ndarray
    """[V, 2] float32 texture coordinates in [0, 1], v up (module docstring)."""
    texture: np.ndarray
    """[S, S, 3] uint8 base colour (sRGB), row 0 at v = 1."""
    coverage: float
    """Fraction of the texels whose centre lies inside a UV triangle (before dilation)."""


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV atlas of a triangle mesh by xatlas, packed for a ``texture_size`` square texture.

    Args: vertices [V, 3] float, faces [F, 3] int.
    Returns (vmapping [V'] int64: the original vertex of each new one, faces [F, 3] int64 into the new
    vertices, uv [V', 2] float32 in [0, 1], v up).
    """
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = ATLAS_PADDING
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    vmapping, indices, uv = atlas[0]
    return vmapping.astype(np.int64), indices.astype(np.int64), uv.astype(np.float32)


def rasterize_uv(uv: torch.Tensor, faces: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which triangle covers each texel centre of a ``size`` x ``size`` texture (module docstring's
    convention), and where.

    Args: uv [V, 2] float in [0, 1] (v up); faces [F, 3] int64.
    Returns (face [S, S] int64, -1 where no triangle covers the texel centre; barycentric [S, S, 3] float32,
    weights of the face's three vertices, 0 where ``face`` is -1).
    """
    pix = torch.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], dim=-1).double()  # (col, row)
    tri = pix[faces]  # [F, 3, 2]
    low = tri.amin(1).ceil().clamp(0, size - 1).long()
    high = tri.amax(1).floor().clamp(0, size - 1).long()
    extent = (high - low + 1).clamp_min(0)  # [F, 2] columns, rows of the texel-centre box
    counts = extent[:, 0] * extent[:, 1]
    face_of = torch.full((size * size,), -1, dtype=torch.long)
    bary_of = torch.zeros(size * size, 3, dtype=torch.float32)
    ends = counts.cumsum(0)
    start = 0
    while start < faces.shape[0]:  # triangle chunks of at most MAX_CANDIDATES (triangle, texel) pairs
        offset = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, offset + MAX_CANDIDATES, right=True)))
        ids = torch.arange(start, stop)
        n = counts[ids]
        face = ids.repeat_interleave(n)
        if face.numel():
            k = torch.arange(face.numel()) - (n.cumsum(0) - n).repeat_interleave(n)
            col = low[face, 0] + k % extent[face, 0]
            row = low[face, 1] + k // extent[face, 0]
            a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
            p = torch.stack([col, row], -1).double()
            ab, ac, ap = b - a, c - a, p - a
            det = ab[:, 0] * ac[:, 1] - ab[:, 1] * ac[:, 0]
            w1 = (ap[:, 0] * ac[:, 1] - ap[:, 1] * ac[:, 0]) / det
            w2 = (ab[:, 0] * ap[:, 1] - ab[:, 1] * ap[:, 0]) / det
            w0 = 1.0 - w1 - w2
            bary = torch.stack([w0, w1, w2], -1)
            inside = (det.abs() > 1e-12) & (bary >= -1e-9).all(-1)
            texel = (row * size + col)[inside]
            face_of[texel] = face[inside]
            bary_of[texel] = bary[inside].float().clamp_min(0)
        start = stop
    return face_of.view(size, size), bary_of.view(size, size, 3)


def dilate(image: torch.Tensor, mask: torch.Tensor, texels: int) -> torch.Tensor:
    """Grow the filled texels of ``image`` [S, S, C] (``mask`` [S, S] bool) by ``texels`` rings: each empty
    texel with filled 8-neighbours takes their mean. Texels still empty afterwards take the mean colour of the
    filled ones. Returns [S, S, C]."""
    img = (image * mask[..., None]).permute(2, 0, 1)[None]  # [1, C, S, S]
    filled = mask[None, None].to(image.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=image.dtype)
    for _ in range(texels):
        total = F.conv2d(img, kernel.expand(img.shape[1], 1, 3, 3), padding=1, groups=img.shape[1])
        count = F.conv2d(filled, kernel, padding=1)
        grow = (filled == 0) & (count > 0)
        img = torch.where(grow, total / count.clamp_min(1), img)
        filled = torch.where(grow, torch.ones_like(filled), filled)
    out = img[0].permute(1, 2, 0)
    done = filled[0, 0] > 0
    if done.any():
        out[~done] = out[done].mean(0)
    return out


@torch.no_grad()
def bake_texture(field: Scene, vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024,
                 chunk: int = 2 ** 18) -> TexturedMesh:
    """Unwrap a mesh (``vertices`` [V, 3] world units, ``faces`` [F, 3]) and bake the base colour of
    ``field`` (a ``Scene``: ``colour(x [M, 3]) -> rgb [M, 3] in [0, 1]`` on ``field.device``) into a ``texture_size``^2 texture."""
    if texture_size < 16:
        raise UserError(f"texture size must be at least 16 texels, got {texture_size}")
    started = time.time()
    vmapping, new_faces, uv = unwrap(vertices, faces, texture_size)
    new_vertices = np.ascontiguousarray(vertices[vmapping], dtype=np.float32)
    unwrapped = time.time()
    face, bary = rasterize_uv(torch.from_numpy(uv), torch.from_numpy(new_faces), texture_size)
    mask = face >= 0
    corners = torch.from_numpy(new_vertices)[torch.from_numpy(new_faces)[face[mask]]]  # [T, 3, 3]
    points = (bary[mask][..., None] * corners).sum(1)  # [T, 3] surface points
    colors = [field.colour(part.to(field.device)).float().clamp(0, 1).cpu() for part in points.split(chunk)]
    image = torch.zeros(texture_size, texture_size, 3)
    if colors:
        image[mask] = torch.cat(colors)
    image = dilate(image, mask, DILATE_TEXELS)
    texture = (image.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    coverage = float(mask.float().mean())
    logger.info("texture: UV atlas of %d faces (%d vertices after seam splits) in %.1f s; %d^2 texels "
                "(%.0f%% covered) baked in %.1f s", new_faces.shape[0], new_vertices.shape[0], unwrapped - started,
                texture_size, 100 * coverage, time.time() - unwrapped)
    return TexturedMesh(new_vertices, new_faces, uv, texture, coverage)


def _trimesh(mesh: TexturedMesh) -> trimesh.Trimesh:
    material = trimesh.visual.material.PBRMaterial(
        name="baked", baseColorTexture=Image.fromarray(mesh.texture), metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=mesh.uv, material=material)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, visual=visual, process=False)


def obj_text(mesh: TexturedMesh, mtl_name: str, material: str = "baked") -> str:
    """Wavefront OBJ of a textured mesh: ``v``, ``vt`` (one per vertex: the vertices are split on seams),
    ``vn`` (area-weighted vertex normals) and ``f v/vt/vn`` lines (1-based), using ``material`` from
    ``mtl_name``."""
    normals = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).vertex_normals
    lines = [f"mtllib {mtl_name}", *(f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices),
             *(f"vt {u:.6f} {v:.6f}" for u, v in mesh.uv), *(f"vn {x:.5f} {y:.5f} {z:.5f}" for x, y, z in normals),
             f"usemtl {material}", *(f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in mesh.faces + 1)]
    return "\n".join(lines) + "\n"


def save_textured(mesh: TexturedMesh, folder: Path, stem: str = "mesh") -> list[Path]:
    """Write ``<stem>.glb`` (base-colour texture in a PBR material, vertex normals) and ``<stem>.obj`` +
    ``<stem>.mtl`` + ``<stem>.png`` into ``folder``, all four or none (``atomic_write_files``: an interrupt or a
    failed write leaves none of them), positions in file axes (Y up, front towards +Z: ``axes.to_file_axes``).
    Returns the paths, glb first."""

    folder = Path(folder)
    mesh = dataclasses.replace(mesh, vertices=to_file_axes(mesh.vertices))
    glb = _trimesh(mesh).export(file_type="glb", include_normals=True)
    png = io.BytesIO()
    Image.fromarray(mesh.texture).save(png, format="PNG")
    mtl = (f"newmtl baked\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nd 1.0\nillum 1\n"
           f"map_Kd {stem}.png\n")
    glb_path, png_path, mtl_path, obj_path = (folder / f"{stem}.{ext}" for ext in ("glb", "png", "mtl", "obj"))
    atomic_write_files({glb_path: glb, png_path: png.getvalue(), mtl_path: mtl.encode(),
                        obj_path: obj_text(mesh, mtl_path.name).encode()})  # the obj renamed last: it names the others
    return [glb_path, obj_path, mtl_path, png_path]

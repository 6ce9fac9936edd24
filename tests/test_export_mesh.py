"""Mesh export on analytic fields: geometry, colours, component filtering, formats, user errors."""

import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from sdsbridge.common.errors import UserError
from sdsbridge.outputs.export.mesh import (auto_threshold, density_grid, extract_mesh, remove_small_components,
                                   save_mesh, sphere_mask)

COLOUR = (0.2, 0.6, 0.9)


class Balls(nn.Module):
    """Solid balls with the NeRFField interface: density falls linearly through ``level`` 5 exactly on
    each ball's surface (slope 100 per unit length, 0 outside), constant colour."""

    device = torch.device("cpu")  # the scene contract's queries: density, colour, device

    def colour(self, x):
        return self(x)[1]

    def __init__(self, balls=(((0.0, 0.0, 0.0), 0.5),), peak_offset=0.05, slope=100.0):
        super().__init__()
        self.centres = torch.tensor([c for c, _ in balls])
        self.radii = torch.tensor([r for _, r in balls])
        self.offset, self.slope = peak_offset, slope
        self.calls = []

    def density(self, x):
        self.calls.append(x.shape[0])
        distance = (x[:, None, :] - self.centres).norm(dim=-1) - self.radii  # [N, balls], < 0 inside
        return (self.slope * (self.offset - distance)).clamp_min(0.0).max(dim=-1).values

    def forward(self, x):
        return self.density(x), torch.tensor(COLOUR).expand(x.shape[0], 3)


class Empty(Balls):
    def density(self, x):
        return torch.full((x.shape[0],), 0.25)


def voxel(resolution, radius=1.0):
    return 2.0 * radius / (resolution - 1)


def test_ball_surface_is_at_its_radius_and_centred():
    for resolution in (64, 65):  # even and odd grids: no half-cell offset either way
        mesh = extract_mesh(Balls(), 1.0, resolution, threshold=5.0)
        radii = np.linalg.norm(mesh.vertices, axis=1)
        h = voxel(resolution)
        assert abs(radii.mean() - 0.5) < 0.05 * h
        assert np.abs(radii - 0.5).max() < 0.25 * h
        assert np.abs(mesh.vertices.mean(axis=0)).max() < 0.05 * h
        assert mesh.vertices.dtype == np.float32 and mesh.threshold_used == 5.0


def test_ball_mesh_is_watertight_outward_and_coloured():
    mesh = extract_mesh(Balls(), 1.0, 64)
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight
    assert tm.volume == pytest.approx(4.0 / 3.0 * np.pi * 0.5 ** 3, rel=0.02)  # positive: normals point out
    expected = np.round(np.array(COLOUR) * 255).astype(np.uint8)
    assert mesh.vertex_colors.dtype == np.uint8 and (mesh.vertex_colors == expected).all()
    assert mesh.density_range[0] == 0.0 and mesh.density_range[1] > 5.0


def test_auto_threshold_lies_between_background_and_object():
    mesh = extract_mesh(Balls(), 1.0, 64, threshold="auto")
    assert 0.0 < mesh.threshold_used <= 5.0
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.5).max() < 1.5 * voxel(64)
    # a foggy background (density 3) and a dense object (100): the level sits above the fog
    densities = np.concatenate([np.full(10000, 3.0), np.full(500, 100.0)])
    assert 3.0 < auto_threshold(densities) < 100.0
    assert auto_threshold(np.full(100, 2.0)) is None


def test_surface_touching_the_scene_sphere_is_closed():
    mesh = extract_mesh(Balls(balls=(((0.6, 0.0, 0.0), 0.6),)), 1.0, 32, threshold=5.0)  # pokes out at +x
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight
    assert np.linalg.norm(mesh.vertices, axis=1).max() <= 1.0 + voxel(32)  # cut by the sphere, within a cell


def test_small_floating_blob_is_removed():
    field = Balls(balls=(((0.0, 0.0, 0.0), 0.4), ((0.75, 0.0, 0.0), 0.06)))
    kept_all = extract_mesh(field, 1.0, 64, threshold=5.0, min_component_fraction=0.0)
    filtered = extract_mesh(field, 1.0, 64, threshold=5.0)
    assert len(trimesh.Trimesh(kept_all.vertices, kept_all.faces, process=False).split(only_watertight=False)) == 2
    assert np.linalg.norm(filtered.vertices, axis=1).max() < 0.45
    assert len(filtered.vertex_colors) == len(filtered.vertices)
    assert filtered.faces.max() == len(filtered.vertices) - 1


def test_component_filter_reindexes_faces():
    vertices = np.arange(24, dtype=np.float32).reshape(8, 3)
    faces = np.array([[4, 5, 6], [0, 1, 2], [1, 2, 3], [0, 2, 3]])  # a 3-face component and a 1-face one
    v, f, removed = remove_small_components(vertices, faces, 0.5)
    assert removed == 1 and len(v) == 4 and (v[f] == vertices[faces[1:]]).all()


def test_chunked_grid_matches_unchunked():
    field = Balls(balls=(((0.1, -0.2, 0.05), 0.3), ((-0.4, 0.3, 0.2), 0.2)))
    whole = density_grid(field, 1.0, 24, chunk=24 ** 3)
    field.calls.clear()
    chunked = density_grid(field, 1.0, 24, chunk=1000)
    assert max(field.calls) <= 1000 and len(field.calls) > 5
    np.testing.assert_array_equal(whole, chunked)
    assert (whole[~sphere_mask(1.0, 24)] == 0).all()


def test_empty_field_is_a_user_error_with_the_density_range():
    with pytest.raises(UserError, match=r"density range \[0.25, 0.25\]") as info:
        extract_mesh(Empty(), 1.0, 16)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"no surface at density level 90.*suggested threshold: 5") as info:
        extract_mesh(Balls(), 1.0, 32, threshold=90.0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_formats_reload_with_counts_and_colours(tmp_path, fmt):
    mesh = extract_mesh(Balls(), 1.0, 24)
    path = save_mesh(mesh, tmp_path / "out" / f"mesh.{fmt}")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [f"mesh.{fmt}"]  # no temp left
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.faces)
    np.testing.assert_allclose(np.asarray(loaded.vertices), mesh.vertices[:, [1, 2, 0]], atol=1e-5)  # Y up
    assert (np.asarray(loaded.visual.vertex_colors)[:, :3] == mesh.vertex_colors).all()


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="glb, obj, ply"):
        save_mesh(extract_mesh(Balls(), 1.0, 16), tmp_path / "mesh.stl")


def test_threshold_may_be_a_numeric_string_but_not_a_word():
    assert extract_mesh(Balls(), 1.0, 16, threshold="5").threshold_used == 5.0
    with pytest.raises(UserError, match="'auto' or a number"):
        extract_mesh(Balls(), 1.0, 16, threshold="otsu")


def test_decimation_reduces_faces():
    full = extract_mesh(Balls(), 1.0, 32)
    mesh = extract_mesh(Balls(), 1.0, 32, decimate_faces=500)
    assert len(full.faces) > 2000 and 400 <= len(mesh.faces) <= 600
    assert len(mesh.vertex_colors) == len(mesh.vertices)


def test_files_are_y_up_with_the_front_towards_plus_z():
    """glTF's axes (what viewers assume): the scene's up (+z) becomes +Y, its front (+x, azimuth 0) +Z, and
    the map is a rotation (orientation and winding kept)."""
    from sdsbridge.outputs.export.axes import to_file_axes

    axes = np.eye(3)
    x, y, z = to_file_axes(axes)
    assert np.array_equal(z, [0, 1, 0]) and np.array_equal(x, [0, 0, 1])
    assert np.isclose(np.linalg.det(to_file_axes(axes)), 1.0)

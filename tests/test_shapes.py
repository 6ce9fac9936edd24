"""Built-in shapes and their renderer: geometry, silhouettes, colours, agreement with the SDF."""

import pytest
import torch

from sdsbridge.scene.cameras import camera_rays, cameras_from_angles
from sdsbridge.priors.shapes import SHAPES, get_shape, render_shape, sphere_trace


def _cams(elevations, azimuths, distance=1.5, fovy=50.0):
    n = len(elevations)
    return cameras_from_angles(torch.tensor(elevations, dtype=torch.float32), torch.tensor(azimuths, dtype=torch.float32),
                               torch.full((n,), distance), torch.full((n,), fovy))


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_fits_scene_and_has_plausible_extent(name):
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(2000, 3, generator=g), dim=-1)
    assert (shape.sdf(directions * shape.bound) > 0).all(), "bounding sphere must contain the shape"
    # Extent: the largest radius of surface points, by bisection of the SDF along each direction.
    lo, hi = torch.zeros(2000), torch.full((2000,), shape.bound)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        inside = shape.sdf(directions * mid[:, None]) < 0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    assert 0.35 <= float(hi.max()) <= 0.6
    assert shape.bound <= 0.6


def test_get_shape_unknown_lists_shapes():
    with pytest.raises(KeyError, match="torus"):
        get_shape("teapot")


def test_torus_hole_is_background_from_overhead():
    cams = _cams([90.0], [0.0])  # straight down the z axis
    rgb, mask = render_shape("torus", cams, 33)
    assert torch.allclose(rgb[0, :, 16, 16], torch.ones(3))
    assert mask[0, 0, 16, 16] == 0
    # ...while the ring around it is red.
    assert mask[0, 0].sum() > 100
    ring = rgb[0][:, mask[0, 0] > 0.5]
    assert (ring[0] > 2 * ring[1]).all() and (ring[0] > 2 * ring[2]).all() and ring[0].max() > 0.6


def test_box_front_centre_is_blue():
    rgb, mask = render_shape("box", _cams([0.0], [0.0]), 33)
    r, g, b = rgb[0, :, 16, 16].tolist()
    assert mask[0, 0, 16, 16] == 1
    assert b > r + 0.3 and b > g + 0.2


@pytest.mark.parametrize("name", list(SHAPES))
def test_object_colour_follows_albedo(name):
    shape = SHAPES[name]
    rgb, mask = render_shape(name, _cams([15.0, 30.0], [20.0, 60.0]), 32)
    covered = mask[:, 0] > 0.99
    mean = rgb.permute(0, 2, 3, 1)[covered].mean(0)
    albedo = torch.tensor(shape.albedo)
    cosine = float(torch.dot(mean, albedo) / (mean.norm() * albedo.norm()))
    assert cosine > 0.97
    assert torch.allclose(rgb.permute(0, 2, 3, 1)[mask[:, 0] == 0], torch.ones(3))  # white background


@pytest.mark.parametrize("name", list(SHAPES))
def test_mask_agrees_with_dense_ray_marching(name):
    shape = SHAPES[name]
    cams = _cams([20.0, -5.0], [35.0, 170.0], distance=1.2)
    res = 17
    _, mask = render_shape(name, cams, res)
    origins, dirs = camera_rays(cams, res, res)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    ts = torch.linspace(0.0, 2.5, 2000)
    points = origins[None] + ts[:, None, None] * dirs[None]  # [T, rays, 3]
    min_sdf = shape.sdf(points.reshape(-1, 3)).reshape(len(ts), -1).min(dim=0).values
    clear = min_sdf.abs() > 0.01  # skip rays that graze the surface
    expected = (min_sdf < 0)[clear]
    assert clear.sum() > 0.8 * clear.numel()
    assert torch.equal(mask.reshape(-1)[clear] > 0.5, expected)
    assert expected.any() and (~expected).any()


def test_sphere_trace_hits_points_on_surface():
    shape = SHAPES["capsule"]
    origins = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.1], [2.0, 0.0, 1.0]])
    dirs = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    hit, points = sphere_trace(shape.sdf, origins, dirs, shape.bound)
    assert hit.tolist() == [True, True, False]
    assert torch.allclose(points[0], torch.tensor([0.2, 0.0, 0.0]), atol=1e-3)


def test_render_shapes_ranges_and_supersampling():
    cams = _cams([10.0, 40.0, 70.0], [0.0, 90.0, -120.0])
    rgb, mask = render_shape("octahedron", cams, 20, supersample=2)
    assert rgb.shape == (3, 3, 20, 20) and mask.shape == (3, 1, 20, 20)
    assert rgb.min() >= 0 and rgb.max() <= 1 and mask.min() >= 0 and mask.max() <= 1
    fractional = (mask > 0) & (mask < 1)
    assert fractional.any(), "supersampled edges are partially covered"
    rgb2, _ = render_shape("octahedron", cams, 20, supersample=2, chunk_rays=900)  # chunked = same
    assert torch.allclose(rgb, rgb2)


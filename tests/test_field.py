"""NeRFField and Background: blob, cube bound, normals, parameter groups, shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdsbridge.config.schema import SceneConfig
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField, finite_difference_normals


def small_scene(**overrides) -> SceneConfig:
    values = dict(n_levels=4, log2_hashmap_size=12, base_resolution=8, per_level_scale=1.5, mlp_width=16,
                  backend="torch")
    values.update(overrides)
    return SceneConfig(**values)


def blob_only(field: NeRFField) -> NeRFField:
    """Zero the density MLP's output layer so raw = 0 and the density is the blob alone."""
    with torch.no_grad():
        field.density_mlp[-1].weight.zero_()
    return field


def test_forward_shapes_and_ranges():
    torch.manual_seed(0)
    field = NeRFField(small_scene())
    x = torch.rand(100, 3) * 2 - 1
    sigma, rgb = field(x)
    assert sigma.shape == (100,) and rgb.shape == (100, 3)
    assert sigma.dtype == torch.float32 and (sigma >= 0).all()
    assert ((rgb >= 0) & (rgb <= 1)).all()
    assert torch.allclose(field.density(x), sigma)


def test_blob_sets_density_at_origin():
    torch.manual_seed(0)
    cfg = small_scene(blob_density=10.0, blob_radius=0.5)
    field = NeRFField(cfg)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.0, 0.75]])
    raw = field.density_mlp(field._features(x))[:, 0]
    expected = F.softplus(raw + torch.tensor([10.0, 5.0, -5.0]))
    assert torch.allclose(field.density(x), expected, rtol=1e-5)
    blob_only(field)
    assert field.density(x[:1]).item() == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-5)


def test_zero_density_outside_cube():
    torch.manual_seed(0)
    field = NeRFField(small_scene(radius=1.0, blob_radius=3.0))  # blob > 0 at the cube's faces
    outside = torch.tensor([[1.2, 0.0, 0.0], [0.5, -1.01, 0.3], [0.0, 0.0, 5.0], [-2.0, 2.0, -2.0]])
    inside = torch.tensor([[0.99, 0.0, 0.0], [0.5, -0.9, 0.3], [-0.99, 0.99, -0.99]])
    assert (field.density(outside) == 0).all()
    assert (field(outside)[0] == 0).all()
    assert (field.density(inside) > 0).all()


def test_radius_scales_the_cube():
    torch.manual_seed(0)
    field = NeRFField(small_scene(radius=2.0, blob_radius=4.0))
    assert (field.density(torch.tensor([[1.5, -1.9, 0.0]])) > 0).all()
    assert (field.density(torch.tensor([[2.1, 0.0, 0.0]])) == 0).all()


def test_blob_normals_point_outward():
    torch.manual_seed(0)
    field = blob_only(NeRFField(small_scene()))
    x = F.normalize(torch.randn(64, 3), dim=-1) * 0.4
    n = field.normals(x, eps=1e-2)
    assert n.shape == (64, 3)
    assert torch.allclose(n.norm(dim=-1), torch.ones(64), atol=1e-4)
    assert (F.cosine_similarity(n, x, dim=-1) > 0.999).all()


def test_finite_difference_normals_of_a_smooth_ball():
    def ball(x):  # density falling off across the surface |x| = 0.5
        return F.softplus(50.0 * (0.5 - x.norm(dim=-1)))

    x = F.normalize(torch.randn(128, 3, dtype=torch.float64), dim=-1) * 0.5
    n = finite_difference_normals(ball, x, eps=1e-3)
    assert torch.allclose(n, x / 0.5, atol=1e-4)


def test_param_groups_partition_parameters():
    field = NeRFField(small_scene())
    groups = field.param_groups()
    assert set(groups) == {"grid", "density", "color"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in field.parameters()}
    assert {id(p) for p in groups["grid"]} == {id(p) for p in field.encoding.parameters()}


def test_background_shapes_and_gradients():
    torch.manual_seed(0)
    bg = Background(small_scene(background_width=8))
    dirs = torch.randn(2, 5, 7, 3)
    out = bg(dirs)
    assert out.shape == (2, 5, 7, 3) and ((out > 0) & (out < 1)).all()
    assert torch.allclose(bg(dirs * 3.0), out, atol=1e-6)  # only the direction matters
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg.parameters())


def test_colour_head_is_parallel_to_density_head():
    """Colour gradients reach the grid and the colour MLP only: they never reshape the density head."""
    torch.manual_seed(0)
    field = NeRFField(small_scene())
    x = torch.rand(64, 3) - 0.5
    _, rgb = field(x)
    rgb.sum().backward()
    assert all(p.grad is None for p in field.density_mlp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.color_mlp.parameters())
    assert field.density_mlp[0].in_features == field.color_mlp[0].in_features == field.encoding.n_output_dims
    assert field.density_mlp[-1].out_features == 1 and field.color_mlp[-1].out_features == 3

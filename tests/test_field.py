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


def test_the_fields_activations_are_the_same_whatever_the_thread_count():
    """sigmoid and softplus give the same bits on 1, 2 or 3 threads (torch's do not on large tensors: the CPU demo's
    runs on one and two threads parted because of them), agree with torch's, and so do their gradients; the field's
    density and colour too."""
    from sdsbridge.scene.nerf.activations import sigmoid, softplus

    torch.manual_seed(0)
    x = torch.randn(100_003, 3) * 8.0
    x[0, 0], x[0, 1], x[0, 2] = 0.0, -200.0, 200.0  # exactly zero, and far beyond exp's range
    before = torch.get_num_threads()
    try:
        for ours, torchs in ((sigmoid, torch.sigmoid), (softplus, F.softplus)):
            values, grads = [], []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                xg = x.clone().requires_grad_(True)
                out = ours(xg)
                out.backward(torch.ones_like(out))
                values.append(out.detach())
                grads.append(xg.grad)
            assert all(torch.equal(values[0], v) for v in values[1:])
            assert all(torch.equal(grads[0], g) for g in grads[1:])
            xt = x.clone().requires_grad_(True)
            expected = torchs(xt)
            expected.backward(torch.ones_like(expected))
            assert torch.allclose(values[0], expected.detach(), rtol=1e-6, atol=1e-6)
            assert torch.allclose(grads[0], xt.grad, rtol=1e-5, atol=1e-6) and torch.isfinite(grads[0]).all()
        field = NeRFField(small_scene())
        with torch.no_grad():
            for parameter in field.parameters():  # pre-activations of a trained field's size, not of a fresh one's
                parameter.mul_(30.0)
        for n_points in (40_001, 65_537, 100_003, 150_001, 250_007):  # each thread's share ends somewhere else
            points = torch.rand(n_points, 3) * 2.0 - 1.0
            with torch.no_grad():
                outputs = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    outputs.append(field(points))
            assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    finally:
        torch.set_num_threads(before)

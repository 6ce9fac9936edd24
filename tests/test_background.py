"""Background: learned view-direction MLP, or a fixed colour."""

import math

import torch

from sdsbridge.config.schema import SceneConfig
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.networks import spherical_harmonics


def test_fixed_background_colour_is_returned_everywhere_and_not_stored():
    background = Background(SceneConfig(background_color=[1.0, 0.5, 0.0]))
    dirs = torch.randn(4, 5, 3)
    colours = background(dirs)
    assert colours.shape == (4, 5, 3)
    assert torch.equal(colours, torch.tensor([1.0, 0.5, 0.0]).expand(4, 5, 3))
    assert "fixed_color" not in background.state_dict()  # checkpoints stay interchangeable


def test_learned_background_depends_on_direction_and_gets_gradients():
    torch.manual_seed(0)
    background = Background(SceneConfig())
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    colours = background(dirs)
    assert not torch.allclose(colours[0], colours[1])
    assert ((colours >= 0) & (colours <= 1)).all()
    colours.sum().backward()
    assert all(p.grad is not None for p in background.parameters())


def test_spherical_harmonics_are_orthonormal_real_harmonics():
    """Monte-Carlo integral of Y_i Y_j over the sphere is the identity, for every degree (bands) 1..4."""
    generator = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(400_000, 3, generator=generator, dtype=torch.float64), dim=-1)
    for degree in (1, 2, 3, 4):
        y = spherical_harmonics(dirs, degree)
        assert y.shape == (dirs.shape[0], degree ** 2)
        gram = 4.0 * math.pi * (y.T @ y) / dirs.shape[0]
        assert torch.allclose(gram, torch.eye(degree ** 2, dtype=torch.float64), atol=0.02)


def test_spherical_harmonics_follow_tcnn_signs_and_order():
    # tcnn: Y1 = -c y, Y2 = c z, Y3 = -c x (c = sqrt(3) / (2 sqrt(pi))); Y6 ~ 3 z^2 - 1; Y8 ~ x^2 - y^2
    c = math.sqrt(3.0) / (2.0 * math.sqrt(math.pi))
    y = spherical_harmonics(torch.eye(3, dtype=torch.float64), 3)  # rows: +x, +y, +z
    assert torch.allclose(y[:, 1:4], torch.tensor([[0, 0, -c], [-c, 0, 0], [0, c, 0]], dtype=torch.float64))
    assert y[2, 6] > 0 and y[0, 6] < 0 and y[0, 8] > 0 and y[1, 8] < 0
    assert torch.allclose(y[:, 4:6], torch.zeros(3, 2, dtype=torch.float64))


def test_background_is_bias_free_sh_mlp():
    background = Background(SceneConfig())
    linears = [m for m in background.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9, 16), (16, 16), (16, 3)]
    assert all(m.bias is None for m in linears)

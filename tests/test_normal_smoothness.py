"""The normal-smoothness regulariser (``loss.normal_smoothness``): it scores a bumpy surface above a smooth
one, its gradient reaches the field's parameters, and it is zero where nothing was rendered."""

import math

import pytest
import torch
from torch import nn

from sdsbridge.config.schema import Config
from sdsbridge.scene.base import RenderOutput
from sdsbridge.scene.cameras import CameraConfig, orbit_cameras
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.renderer import Renderer
from sdsbridge.scene.nerf_scene import NeRFScene, build_nerf_scene
from sdsbridge.training.step import normal_smoothness_loss


class Ball(nn.Module):
    """A ball of radius 0.3 as a NeRF (density 1000 * (0.3 - |x| + bumps), clamped at 0), optionally with
    bumps 0.24 * sin(15x) sin(15y) sin(15z) on it; grey."""

    device = torch.device("cpu")

    def __init__(self, bumps: bool):
        super().__init__()
        self.bumps = bumps

    def density(self, x):
        height = 0.24 * torch.sin(15 * x).prod(dim=-1) if self.bumps else 0.0
        return (1000.0 * (0.3 - x.norm(dim=-1) + height)).clamp_min(0.0)

    def forward(self, x):
        return self.density(x), torch.full_like(x, 0.5)

    def colour(self, x):
        return torch.full_like(x, 0.5)


def ball_scene(bumps: bool) -> NeRFScene:
    config = Config(prompt="a ball")
    config.render.sampler, config.render.num_samples = "stratified", 128
    field, background = Ball(bumps), Background(config.scene)
    return NeRFScene(field, background, Renderer(field, background, config.render, radius=config.scene.radius))


def rendered(scene, views: int = 2, size: int = 32):
    cameras = orbit_cameras(CameraConfig(), views)
    with torch.no_grad():
        return cameras, scene.eval().render(cameras, size, size)


def test_a_bumpy_surface_scores_higher_than_a_smooth_one():
    step = 2 * 1.5 * math.tan(math.radians(35)) / 32  # one 32 px pixel at distance 1.5
    scores = {}
    for bumps in (False, True):
        scene = ball_scene(bumps)
        torch.manual_seed(0)
        scores[bumps] = float(normal_smoothness_loss(scene, *rendered(scene), n_points=512, step_size=step))
    # over a tangent step d a sphere's normal turns by |d| / radius: about 0.3 here
    assert scores[False] == pytest.approx(step * math.sqrt(2) / 0.3, rel=0.3)
    assert scores[True] > 2 * scores[False]


def test_its_gradient_reaches_the_hash_grid_and_both_heads_of_density():
    config = Config(prompt="a blob")
    config.scene.n_levels, config.scene.log2_hashmap_size, config.render.sampler = 4, 12, "stratified"
    torch.manual_seed(0)
    scene = build_nerf_scene(config.scene, config.render, {"grid": 1e-2, "density": 1e-3, "color": 1e-3,
                                                          "background": 1e-3}, torch.device("cpu"))
    cameras = orbit_cameras(config.cameras, 1)
    out = scene.render(cameras, 16, 16)
    assert (out.opacity > 0.5).any()  # the density blob renders opaque in the middle
    loss = normal_smoothness_loss(scene, cameras, out, n_points=64, step_size=0.05)
    loss.backward()
    grid, density, colour = scene.field.param_groups()["grid"], scene.field.density_mlp, scene.field.color_mlp
    assert loss > 0 and grid[0].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in density.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in colour.parameters())  # geometry only


def test_it_is_zero_where_nothing_was_rendered():
    scene = ball_scene(False)
    cameras, out = rendered(scene, views=1, size=8)
    empty = RenderOutput(out.rgb, torch.zeros_like(out.opacity), out.depth, out.background, 0.0)
    assert float(normal_smoothness_loss(scene, cameras, empty, n_points=16, step_size=0.05)) == 0.0


def test_the_official_recipe_leaves_it_off():
    assert Config(prompt="a hamburger").loss.normal_smoothness == 0.0


@pytest.mark.parametrize("value", ["-1", "[0, 1.0, -2.0, 10]"])
def test_a_negative_weight_is_refused(value, tmp_path):
    from sdsbridge.common.errors import UserError
    from sdsbridge.config.loader import load_config

    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a red torus\n")
    with pytest.raises(UserError, match="loss.normal_smoothness"):
        load_config(path, [f"loss.normal_smoothness={value}"])

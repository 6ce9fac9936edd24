"""Turntable video: frame count, size (even, two panels), decodes, atomic write, renderer mode restored."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from sdsbridge.scene.nerf_scene import NeRFScene

from sdsbridge.config.schema import RenderConfig, SceneConfig
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.common.errors import UserError
from sdsbridge.outputs.export.shading import NORMAL_METHODS, density_normals
from sdsbridge.outputs.export.video import parse_modes, render_turntable
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.renderer import Renderer


class RedBall(nn.Module):
    """A dense red ball of radius 0.4 (NeRFField interface)."""

    def density(self, x):
        return torch.where(x.norm(dim=-1) < 0.4, 50.0, 0.0)

    def forward(self, x):
        return self.density(x), torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)


def tiny_scene():
    field, background = RedBall(), Background(SceneConfig(background_width=4))
    renderer = Renderer(field, background, RenderConfig(sampler="stratified", num_samples=32), radius=1.0)
    return NeRFScene(field, background, renderer)


def test_turntable_frames_size_and_content(tmp_path):
    scene = tiny_scene()
    path = render_turntable(scene, CameraConfig(), tmp_path / "video" / "turntable.mp4", frames=8, resolution=32,
                            fps=10, background_color=(1.0, 1.0, 1.0), progress=False, modes=("rgb", "depth"))
    assert path == tmp_path / "video" / "turntable.mp4"
    assert [p.name for p in path.parent.iterdir()] == ["turntable.mp4"]  # no temp file left
    frames = iio.imread(path, index=None)
    assert frames.shape == (8, 32, 64, 3) and frames.dtype == np.uint8
    centre = frames[:, 14:18, 14:18].reshape(-1, 3).mean(0)  # the ball on the rgb panel
    assert centre[0] > 150 and centre[1] < 90
    assert frames[:, :3, :3].mean() > 200  # white background corner
    assert frames[:, 14:18, 46:50].mean() > 60 and frames[:, :3, 32:35].mean() < 40  # depth: ball lit, sky black
    assert scene.renderer.training  # mode restored


def test_odd_resolution_is_padded_to_even(tmp_path):
    path = render_turntable(tiny_scene(), CameraConfig(), tmp_path / "t.mp4", frames=3, resolution=17, fps=5,
                            progress=False)
    frames = iio.imread(path, index=None)
    assert frames.shape == (3, 18, 34, 3)  # default panels: rgb | normal


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="frames=0"):
        render_turntable(tiny_scene(), CameraConfig(), tmp_path / "t.mp4", frames=0, progress=False)
    assert not any(tmp_path.iterdir())


class SmoothBall(nn.Module):
    """A ball of radius 0.4 whose density rises smoothly inwards (differentiable, so both normal methods
    apply), grey-blue."""

    def density(self, x):
        return 200.0 * torch.sigmoid(40.0 * (0.4 - x.norm(dim=-1)))

    def forward(self, x):
        return self.density(x), torch.tensor([0.3, 0.3, 0.8]).expand(x.shape[0], 3)


@pytest.mark.parametrize("method", NORMAL_METHODS)
def test_ball_normals_are_the_radial_direction(method):
    points = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    normals = density_normals(SmoothBall(), 0.4 * points, step=2.0 / 64, method=method)
    assert (normals * points).sum(-1).min() > 0.999


def test_normal_and_shaded_panels_show_a_ball_facing_the_camera(tmp_path):
    field, background = SmoothBall(), Background(SceneConfig(background_width=4))
    renderer = Renderer(field, background, RenderConfig(sampler="stratified", num_samples=64), radius=1.0)
    path = render_turntable(NeRFScene(field, background, renderer), CameraConfig(), tmp_path / "t.mp4", frames=2,
                            resolution=32, fps=5, background_color=(1.0, 1.0, 1.0), progress=False,
                            modes=("rgb", "normal", "shaded", "depth"))
    frames = iio.imread(path, index=None).astype(float)
    assert frames.shape == (2, 32, 128, 3)
    normal, shaded = frames[:, :, 32:64], frames[:, :, 64:96]
    centre = normal[:, 15:17, 15:17].reshape(-1, 3).mean(0)  # facing the viewer: (n + 1) / 2 = (0.5, 0.5, 1)
    assert abs(centre[0] - 128) < 25 and abs(centre[1] - 128) < 25 and centre[2] > 225
    # the ball covers about columns and rows 10-22 (radius 0.4 at distance 1.5, fovy 70 degrees)
    assert normal[:, 15:17, 10:12, 0].mean() < 80  # left limb: normal points left, red low
    assert normal[:, 10:12, 15:17, 1].mean() > 170  # top limb: normal points up, green high
    assert shaded[:, 12:14, 12:14].mean() > shaded[:, 19:21, 19:21].mean() + 30  # lit from the upper left
    assert normal[:, :2, :2].mean() > 240 and shaded[:, :2, :2].mean() > 240  # white background


def test_mode_lists_are_checked():
    assert parse_modes("rgb,normal") == ("rgb", "normal")
    assert parse_modes(" shaded ,depth") == ("shaded", "depth")
    for bad in ("", "rgb,rgb", "rgb,albedo"):
        with pytest.raises(UserError, match="--mode"):
            parse_modes(bad)

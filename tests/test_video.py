"""Turntable video: frame count, size (even, two panels), decodes, atomic write, renderer mode restored."""

from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from sdsbridge.config import CameraConfig, RenderConfig, SceneConfig
from sdsbridge.errors import UserError
from sdsbridge.export.video import render_turntable
from sdsbridge.nerf.background import Background
from sdsbridge.nerf.renderer import Renderer


class RedBall(nn.Module):
    """A dense red ball of radius 0.4 (NeRFField interface)."""

    def density(self, x):
        return torch.where(x.norm(dim=-1) < 0.4, 50.0, 0.0)

    def forward(self, x):
        return self.density(x), torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)


def tiny_scene():
    renderer = Renderer(RedBall(), Background(SceneConfig(background_width=4)),
                        RenderConfig(sampler="stratified", num_samples=32), radius=1.0)
    return SimpleNamespace(renderer=renderer)


def test_turntable_frames_size_and_content(tmp_path):
    scene = tiny_scene()
    path = render_turntable(scene, CameraConfig(), tmp_path / "video" / "turntable.mp4", frames=8, resolution=32,
                            fps=10, background_color=(1.0, 1.0, 1.0), progress=False)
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
    assert frames.shape == (3, 18, 34, 3)


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="frames=0"):
        render_turntable(tiny_scene(), CameraConfig(), tmp_path / "t.mp4", frames=0, progress=False)
    assert not any(tmp_path.iterdir())

"""Evaluation helpers: PSNR, saturation error, prompt -> shape, ground-truth views, Chamfer distance."""

import math

import mcubes
import numpy as np
import pytest
import torch

from sdsbridge.scene.cameras import orbit_cameras
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.common.errors import UserError
from sdsbridge.outputs.scores import (chamfer_distance, psnr, reference_views, sample_sdf_surface, saturation_error,
                                shape_for_prompt)
from sdsbridge.priors.shapes import SHAPES


def test_psnr_identical_and_known_noise():
    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    assert psnr(target, target.clone()) == math.inf
    signs = torch.where(torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    assert psnr(target + 0.1 * signs, target) == pytest.approx(20.0, abs=1e-4)  # MSE = 0.01
    assert psnr(target + 0.01, target) == pytest.approx(40.0, abs=1e-3)


def test_saturation_error():
    target = torch.zeros(1, 3, 4, 4)
    target[:, 0] = 1.0  # pure red: saturation 1
    grey = torch.full((1, 3, 4, 4), 0.5)  # saturation 0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    assert saturation_error(target, target, mask) == 0.0
    assert saturation_error(grey, target, mask) == pytest.approx(1.0)
    half = target.clone()
    half[..., 2:, :] = 0.5  # greyed outside the mask only: no error inside it
    assert saturation_error(half, target, mask) == 0.0
    pale = target * 0.5 + 0.5  # (1, .5, .5): saturation 0.5
    assert saturation_error(pale, target, mask) == pytest.approx(0.5)


def test_shape_for_prompt():
    assert shape_for_prompt("a red torus, detailed high resolution, high quality, sharp") == "torus"
    assert shape_for_prompt("a DSLR photo of a blue box, front view") == "box"
    for bad in ("", "a pineapple", "a red torus and a blue box"):
        with pytest.raises(UserError):
            shape_for_prompt(bad)


def test_reference_views_are_renders_over_white():
    cams = orbit_cameras(CameraConfig(), 3)
    rgb, mask = reference_views("box", cams, 24)
    assert rgb.shape == (3, 3, 24, 24) and mask.shape == (3, 1, 24, 24)
    assert torch.equal(rgb[:, :, 0, 0], torch.ones(3, 3))  # corners are background
    assert 0.05 < float(mask.mean()) < 0.6


def _mesh_of(shape, level=0.0, n=80, half=0.7):
    lin = torch.linspace(-half, half, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    sdf = shape.sdf(grid).reshape(n, n, n).numpy()
    vertices, faces = mcubes.marching_cubes(level - sdf, 0.0)  # inside positive
    vertices = vertices / (n - 1) * 2 * half - half
    return torch.from_numpy(vertices), torch.from_numpy(faces.astype(np.int64))


def test_sdf_surface_samples_lie_on_the_surface():
    for shape in SHAPES.values():
        points = sample_sdf_surface(shape, 2000, torch.Generator().manual_seed(0))
        assert points.shape == (2000, 3)
        assert float(shape.sdf(points).abs().max()) < 1e-5


def test_chamfer_of_the_sdf_mesh_is_small_and_shift_is_measured():
    torus = SHAPES["torus"]
    vertices, faces = _mesh_of(torus)
    exact = chamfer_distance(vertices, faces, torus)
    assert exact < 0.01
    small = chamfer_distance(vertices, faces, torus, n_points=2000)
    assert chamfer_distance(vertices, faces, "torus", n_points=2000) == small  # deterministic; name or Shape
    # An offset surface (level set at +delta of an exact SDF) is delta away everywhere.
    delta = 0.04
    offset = chamfer_distance(*_mesh_of(torus, level=delta), torus, n_points=8000)
    assert offset == pytest.approx(delta, abs=0.008)
    # A translated mesh: within the shift (tangent motion is not a distance), and most of it.
    shifted = chamfer_distance(vertices + torch.tensor([0.0, 0.0, delta], dtype=torch.float64), faces, torus,
                               n_points=8000)
    assert 0.4 * delta < shifted < delta + 0.005
    assert chamfer_distance(vertices[:0], faces[:0], torus) == math.inf

"""Evaluation: an analytic scene that *is* the red torus scores near-perfectly; a Stable Diffusion run is
reported as unscorable; a real tiny reference-prior run gives finite numbers, a mesh file and a video."""

import math
from pathlib import Path

import pytest
import torch
import trimesh
from torch import nn

from sdsbridge.scene.nerf_scene import NeRFScene

from sdsbridge.config.loader import load_config
from sdsbridge.config.schema import Config
from sdsbridge.training.step import normal_step
from sdsbridge.outputs.evaluation import evaluate_scene
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.renderer import Renderer
from sdsbridge.priors.shapes import get_shape, shade


class ShapeField(nn.Module):
    """A built-in shape as a NeRF: density max(0, 1000 * (0.005 - sdf)) (5, the auto level, on the
    surface; linear across it, as marching cubes assumes), colour = the shape's shading."""

    device = torch.device("cpu")  # the scene contract's queries: density, colour, device

    def colour(self, x):
        return self(x)[1]

    def __init__(self, name):
        super().__init__()
        self.shape = get_shape(name)

    def density(self, x):
        return (1000.0 * (0.005 - self.shape.sdf(x))).clamp_min(0.0)

    def forward(self, x):
        rgb = shade(self.shape, x).clamp(0, 1) if x.shape[0] else x.new_zeros(0, 3)
        return self.density(x), rgb


def analytic_setup(kind="reference", prompt="a red torus"):
    config = Config(prompt=prompt)
    config.prior.kind = kind
    config.render.sampler = "stratified"
    config.render.num_samples = 256
    field, background = ShapeField("torus"), Background(config.scene)
    renderer = Renderer(field, background, config.render, radius=config.scene.radius)
    return NeRFScene(field, background, renderer), config


def test_the_true_shape_scores_near_perfectly():
    scene, config = analytic_setup()
    result = evaluate_scene(scene, config, step=7, n_views=4, resolution=32, mesh_resolution=64, n_points=4000)
    assert result["scored"] and result["shape"] == "torus" and result["step"] == 7
    assert result["psnr_db"] > 25.0
    assert result["chamfer"] < 0.02
    assert result["saturation_error"] < 0.05 and result["mask_iou"] > 0.9
    assert result["normal_error_deg"] < 12.0  # the field's density normals against the SDF's
    assert 0.0 < result["threshold"] <= 5.0 and result["mesh_faces"] > 1000
    assert scene.renderer.training  # eval mode was only for the renders


def test_normals_are_differenced_over_a_training_pixel_or_a_64th_of_the_cube():
    """The demo's 32 px renders at distance 1.5 and 70 deg resolve 0.066 scene units; 512 px GPU runs resolve
    finer than 1/64 of the cube, which then sets the step."""
    demo = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml", [])
    assert normal_step(demo, demo.scene.radius) == pytest.approx(2 * 1.5 * math.tan(math.radians(35)) / 32)
    official = Config(prompt="a hamburger")
    assert normal_step(official, official.scene.radius) == pytest.approx(2 * official.scene.radius / 64)


def test_the_true_shape_keeps_its_normals_at_the_demos_coarser_step():
    scene, config = analytic_setup()
    config.render.resolution, config.cameras.distance_range, config.cameras.fovy_range = 32, [1.5, 1.5], [70, 70]
    assert normal_step(config, scene.radius) > 2 * scene.radius / 64
    result = evaluate_scene(scene, config, step=7, n_views=4, resolution=32, mesh_resolution=32, n_points=1000)
    assert result["normal_error_deg"] < 12.0


def test_a_wrong_shape_scores_badly():
    scene, config = analytic_setup(prompt="a blue box")
    result = evaluate_scene(scene, config, step=0, n_views=4, resolution=32, mesh_resolution=48, n_points=2000)
    assert result["psnr_db"] < 15.0 and result["chamfer"] > 0.05
    assert result["normal_error_deg"] > 20.0


def test_stable_diffusion_run_is_reported_unscorable():
    scene, config = analytic_setup(kind="stable-diffusion", prompt="a DSLR photo of a pineapple")
    result = evaluate_scene(scene, config, step=3, n_views=2, resolution=16, mesh_resolution=32)
    assert result["scored"] is False and "no ground truth" in result["reason"]
    assert "psnr_db" not in result and "chamfer" not in result
    assert 0.0 < result["mean_opacity"] < 1.0 and result["mesh_faces"] > 0


@pytest.fixture(scope="module")
def tiny_reference_run(tmp_path_factory):
    from sdsbridge.config.loader import load_config
    from sdsbridge.training.loop import train

    tmp = tmp_path_factory.mktemp("eval-run")
    (tmp / "prompt.yaml").write_text("prompt: a red torus\n")
    config = load_config(tmp / "prompt.yaml", [
        "scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
        "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "log.val_every=0",
        "export.mesh=false", "export.video=false", "device=cpu", "prior.kind=reference", "prior.resolution=16",
        "prior.views_per_label=8", "train.steps=2", f"log.runs_dir={tmp / 'runs'}"])
    run_dir = tmp / "run"
    run_dir.mkdir()
    train(config, run_dir, torch.device("cpu"), show_progress=False)
    return run_dir


def test_real_run_evaluates_to_finite_numbers(tiny_reference_run):
    from sdsbridge.outputs.evaluation import evaluate_run

    result = evaluate_run(tiny_reference_run, "cpu", n_views=2, mesh_resolution=32, n_points=2000)
    assert result["step"] == 2 and result["resolution"] == 16
    for key in ("psnr_db", "chamfer", "saturation_error", "mask_iou", "mean_opacity", "threshold"):
        assert math.isfinite(result[key]), key


def test_real_run_exports_mesh_and_video(tiny_reference_run):
    import imageio.v3 as iio

    from sdsbridge.outputs.export.mesh import export_run_mesh
    from sdsbridge.outputs.export.video import render_run_video

    mesh_path = export_run_mesh(tiny_reference_run, "ply", resolution=32)
    assert mesh_path.parent == tiny_reference_run / "mesh" and mesh_path.name.startswith("mesh-step")
    assert mesh_path.name.endswith("-res32.ply")
    assert len(trimesh.load(mesh_path, force="mesh", process=False).faces) > 0
    video_path = render_run_video(tiny_reference_run, frames=4, resolution=16, fps=4, progress=False)
    assert video_path.parent == tiny_reference_run / "video" and video_path.name.endswith("-4f-16px-4fps.mp4")
    assert iio.imread(video_path, index=None).shape == (4, 16, 32, 3)

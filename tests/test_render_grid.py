"""The renderer with the PyTorch occupancy grid ('occupancy-torch'): agreement with the dense stratified
renderer on the analytic ball and on a fitted (trained) field, gradients, the grid in checkpoints and exact
resume on the CPU, and the CUDA checks (against the dense renderer and nerfacc's own grid)."""

import logging
import math

import pytest
import torch
from torch import nn

from sdsbridge.scene.cameras import cameras_from_angles
from sdsbridge.training.checkpoint import find_checkpoint, load_checkpoint
from sdsbridge.config.schema import RenderConfig, SceneConfig
from sdsbridge.config.loader import load_config
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.scene.nerf.renderer import Renderer, choose_sampler
from sdsbridge.testing.shape_fit import fit_field_to_shape
from sdsbridge.training.loop import train

COLOR = (0.9, 0.2, 0.1)
WHITE = torch.ones(3)


class Ball(nn.Module):
    """Solid ball of radius 0.5, density ``sigma`` inside, constant colour."""

    def __init__(self, sigma=1e3):
        super().__init__()
        self.sigma = sigma
        self.register_buffer("color", torch.tensor(COLOR))

    def density(self, x):
        return torch.where(x.norm(dim=-1) < 0.5, self.sigma, 0.0)

    def forward(self, x):
        return self.density(x), self.color.expand(x.shape[0], 3)


def camera(distance=2.0, fovy=50.0, elevation=0.0, azimuth=0.0, device="cpu"):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return cameras_from_angles(t(elevation), t(azimuth), t(distance), t(fovy)).to(device)


def renderers(field, device="cpu", dense_samples=512, **grid_cfg):
    """(grid renderer in eval mode, its grid filled from the field; dense renderer in eval mode)."""
    bg = Background(SceneConfig(background_width=8), device=device)
    grid = Renderer(field, bg, RenderConfig(sampler="occupancy-torch", **grid_cfg), radius=1.0).eval()
    dense = Renderer(field, bg, RenderConfig(sampler="stratified", num_samples=dense_samples), radius=1.0).eval()
    return grid, dense


def psnr(a, b):
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_ball_agrees_with_the_dense_renderer():
    grid, dense = renderers(Ball())
    cam = camera(2.0, 50.0)
    with torch.no_grad():
        a, b = grid.render(cam, 64, 64), dense.render(cam, 64, 64)
    assert grid.sampler == "occupancy-torch"
    assert grid.eval_step_size == pytest.approx(1.732 * 2 / 128)  # eval renders: render.occupancy_eval_samples
    # silhouettes: only edge pixels differ
    assert (a.opacity - b.opacity).abs().mean() < 0.005
    assert ((a.opacity > 0.5) != (b.opacity > 0.5)).float().mean() < 0.01
    inside = (a.opacity[0, ..., 0] > 0.999) & (b.opacity[0, ..., 0] > 0.999)
    assert inside.sum() > 500
    assert torch.allclose(a.rgb[0][inside], torch.tensor(COLOR), atol=1e-3)
    surface_a = (a.depth / a.opacity)[0, ..., 0][inside]
    surface_b = (b.depth / b.opacity)[0, ..., 0][inside]
    # each renderer's first sample inside the ball lies up to one of its steps past the surface (opaque: the
    # depth is that sample's); where a ray grazes the ball, a cell's jittered fill points may all miss it
    error, steps = (surface_a - surface_b).abs(), grid.eval_step_size + 2.0 / 512
    assert error.mean() < 0.5 * steps and (error < steps).float().mean() > 0.98
    assert a.samples_per_ray < 0.02 * b.samples_per_ray  # an opaque ball: about one sample per hit ray


@pytest.fixture(scope="module")
def fitted_field():
    """A small hash-grid field fitted to the torus (a scene with a real, sharp surface)."""
    torch.manual_seed(0)
    field = NeRFField(SceneConfig(n_levels=6, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.6,
                                  mlp_width=32))
    field.encoding.compile_kernels = False  # eager throughout: no compile time in a short test
    fit_field_to_shape(field, "torus", steps=50, points=4096, peak=100.0, width=0.02)
    return field.eval()


@pytest.mark.parametrize("azimuth,elevation", [(0.0, 15.0), (60.0, 40.0)])
def test_fitted_field_agrees_with_the_dense_renderer(fitted_field, azimuth, elevation):
    _, dense = renderers(fitted_field, dense_samples=256)  # a fine dense render: close to the exact integral
    cam = camera(1.5, 70.0, elevation, azimuth)
    with torch.no_grad():
        truth = dense.render(cam, 48, 48, background_color=WHITE)
        assert truth.opacity.max() > 0.99 and (truth.opacity > 0.5).float().mean() > 0.05  # the torus is in view
        # Without the alpha threshold only the grid's empty-space skipping differs from the dense integral.
        torch.manual_seed(0)
        grid, _ = renderers(fitted_field, occupancy_alpha_threshold=0.0)
        exact = grid.render(cam, 48, 48, background_color=WHITE)
        assert psnr(exact.rgb, truth.rgb) >= 40.0
        assert (exact.opacity - truth.opacity).abs().mean() < 0.005
        both = (exact.opacity > 0.99) & (truth.opacity > 0.99)
        assert (exact.depth - truth.depth)[both].abs().mean() < 0.005  # world units (the scene is 2 wide)
        assert exact.samples_per_ray < 0.2 * truth.samples_per_ray
        # The default alpha threshold (nerfacc's and threestudio's 0.01) drops samples of alpha < 0.01, i.e.
        # faint density (sigma < 1.5 at this step) is not rendered: close, but not the same image.
        torch.manual_seed(0)
        grid, _ = renderers(fitted_field)
        default = grid.render(cam, 48, 48, background_color=WHITE)
        assert psnr(default.rgb, truth.rgb) >= 30.0
        assert (default.opacity - truth.opacity).abs().mean() < 0.02


def test_gradient_path_renders_what_the_no_grad_path_renders(fitted_field):
    grid, _ = renderers(fitted_field)
    cam = camera(1.5, 70.0, 20.0, 30.0)
    torch.manual_seed(0)
    with torch.no_grad():
        fused = grid.render(cam, 32, 32)  # fills the grid, then one pass of the whole field
    with_grad = grid.render(cam, 32, 32)  # density pass, then the kept samples through the field again
    for name in ("rgb", "opacity", "depth"):
        assert torch.allclose(getattr(fused, name), getattr(with_grad, name), atol=1e-5), name
    (with_grad.rgb.mean() + with_grad.opacity.mean()).backward()
    for name, p in fitted_field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        p.grad = None


def test_sampler_choice_and_log_on_the_cpu(caplog):
    cpu = torch.device("cpu")
    assert choose_sampler("occupancy", cpu)[0] == "occupancy-torch"
    assert choose_sampler("occupancy-torch", cpu)[0] == "occupancy-torch"
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        Renderer(Ball(), Background(SceneConfig()), RenderConfig(sampler="occupancy"), radius=1.0)
    assert "PyTorch occupancy-grid" in caplog.text and "no CUDA device" in caplog.text


SMALL = ["scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
         "scene.background_width=8", "render.resolution=16", "render.sampler=occupancy-torch",
         "render.num_samples_occupancy=96", "render.occupancy_update_every=2", "log.val_every=0", "log.log_every=1",
         "export.mesh=false", "export.video=false", "device=cpu", "prior.kind=reference", "prior.resolution=16",
         "prior.views_per_label=8", "train.batch_size=2"]


def grid_config(tmp_path, *extra):
    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a red torus\n")
    return load_config(path, [*SMALL, f"log.runs_dir={tmp_path / 'runs'}", *extra])


def test_grid_is_checkpointed_and_resume_is_bit_identical(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir()
    halves.mkdir()
    cpu = torch.device("cpu")
    train(grid_config(tmp_path, "train.steps=6"), straight, cpu, show_progress=False)
    train(grid_config(tmp_path, "train.steps=3"), halves, cpu, show_progress=False)
    middle = load_checkpoint(find_checkpoint(halves))
    assert middle["renderer"]["occupancy.binaries"].shape == (1, 32, 32, 32)
    train(grid_config(tmp_path, "train.steps=6"), halves, cpu, checkpoint=middle, show_progress=False)
    expected, got = load_checkpoint(find_checkpoint(straight)), load_checkpoint(find_checkpoint(halves))
    for part in ("field", "background", "renderer"):
        assert expected[part].keys() == got[part].keys()
        for key in expected[part]:
            assert torch.equal(expected[part][key], got[part][key]), f"{part}.{key}"
    occupied = got["renderer"]["occupancy.binaries"].float().mean()
    assert 0.0 < occupied < 0.5  # the blob's cells, not the whole cube


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_grid_on_cuda_agrees_with_dense_and_nerfacc():
    from sdsbridge.scene.nerf.renderer import nerfacc_cuda_available

    grid, dense = renderers(Ball().cuda(), device="cuda", num_samples_occupancy=1024, occupancy_eval_samples=1024)
    cam = camera(2.0, 50.0, device="cuda")
    with torch.no_grad():
        a, b = grid.render(cam, 64, 64), dense.render(cam, 64, 64)
    assert (a.opacity - b.opacity).abs().mean() < 0.005
    assert torch.allclose(a.rgb[0, 32, 32], b.rgb[0, 32, 32], atol=1e-3)
    if not nerfacc_cuda_available():
        pytest.skip("nerfacc's CUDA kernels do not load here")
    theirs = Renderer(grid.field, grid.background, RenderConfig(sampler="occupancy", num_samples_occupancy=1024,
                                                                occupancy_eval_samples=1024), radius=1.0)
    assert theirs.sampler == "occupancy"
    theirs.load_state_dict(grid.state_dict())  # same grid: the two samplers must render the same image
    theirs.eval()
    with torch.no_grad():
        c = theirs.render(cam, 64, 64)
    assert (a.opacity - c.opacity).abs().mean() < 1e-3
    assert torch.allclose(a.rgb, c.rgb, atol=2e-2)
    assert (a.depth - c.depth).abs().max() < 0.01


def test_nerfaccs_grid_is_updated_by_our_deterministic_rule(monkeypatch):
    """With nerfacc's sampler the grid's refresh is ours (cells drawn twice keep their largest sample) writing into
    nerfacc's own buffers, so it equals the PyTorch grid's bit for bit, past the warm-up too (nerfacc's own update
    leaves the winner of a duplicate undefined on CUDA). The update needs no CUDA kernel, so the CPU shows it."""
    import nerfacc

    from sdsbridge.scene.nerf import renderer as renderer_module

    field = NeRFField(SceneConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8, mlp_width=16))
    bg = Background(SceneConfig(background_width=8))
    ours = Renderer(field, bg, RenderConfig(sampler="occupancy-torch", occupancy_resolution=16), radius=1.0)
    monkeypatch.setattr(renderer_module, "choose_sampler", lambda requested, device: ("occupancy", "test"))
    theirs = Renderer(field, bg, RenderConfig(sampler="occupancy", occupancy_resolution=16), radius=1.0)
    assert isinstance(theirs.estimator, nerfacc.OccGridEstimator)
    for step in (0, 256, 272, 288):  # the warm-up's full pass, then draws with repeats
        torch.manual_seed(step)
        ours.update_occupancy(step)
        torch.manual_seed(step)
        theirs.update_occupancy(step)
        assert torch.equal(ours.estimator.occs, theirs.estimator.occs)
        assert torch.equal(ours.estimator.binaries, theirs.estimator.binaries)
    assert theirs.state_dict()["occupancy.occs"].abs().sum() > 0  # nerfacc's buffers hold the updates
    assert theirs._updates.occs is theirs.estimator.occs and theirs._updates.binaries is theirs.estimator.binaries


def test_the_nerfacc_probe_runs_once_per_process(monkeypatch, caplog):
    import sys
    import types

    from sdsbridge.scene.nerf.renderer import nerfacc_cuda_available

    looked_up = []

    class Backend(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            looked_up.append(name)
            raise ImportError("no kernels")

    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", Backend("nerfacc.cuda._backend"))
    nerfacc_cuda_available.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="sdsbridge"):
            assert nerfacc_cuda_available() is False and nerfacc_cuda_available() is False
    finally:
        nerfacc_cuda_available.cache_clear()
    assert looked_up == ["_C"]
    assert caplog.text.count("checking nerfacc's CUDA kernels") == 1

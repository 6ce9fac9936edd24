"""Renderer: an analytic ball checks geometry (opacity, depth, silhouette, colour); chunking, backgrounds,
gradients, sampler choice and the nerfacc occupancy-grid path (GPU only)."""

import logging
import math

import pytest
import torch
from torch import nn

from sdsbridge.scene.cameras import cameras_from_angles
from sdsbridge.config.schema import RenderConfig, SceneConfig
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.scene.nerf.renderer import Renderer, choose_sampler, ray_sphere_intersect, stratified_samples

BALL_COLOR = (0.9, 0.2, 0.1)


class Ball(nn.Module):
    """Solid ball of radius ``r`` at the origin, constant colour, density ``sigma`` inside, 0 outside."""

    def __init__(self, r=0.5, sigma=1e3, color=BALL_COLOR):
        super().__init__()
        self.r, self.sigma = r, sigma
        self.register_buffer("color", torch.tensor(color))

    def density(self, x):
        return torch.where(x.norm(dim=-1) < self.r, self.sigma, 0.0)

    def forward(self, x):
        return self.density(x), self.color.expand(x.shape[0], 3)


def camera(distance=2.0, fovy=40.0, elevation=0.0, azimuth=0.0, device="cpu"):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return cameras_from_angles(t(elevation), t(azimuth), t(distance), t(fovy)).to(device)


def ball_renderer(num_samples=128, device="cpu", **render):
    bg = Background(SceneConfig(background_width=8), device=device)
    r = Renderer(Ball().to(device), bg, RenderConfig(sampler="stratified", num_samples=num_samples, **render),
                 radius=1.0)
    return r.eval()


def small_scene():
    return SceneConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8, per_level_scale=1.5, mlp_width=16,
                       background_width=8, backend="torch")


def test_ray_sphere_intersect_outside_inside_miss_behind():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.5], [0.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    t_near, t_far, hit = ray_sphere_intersect(o, d, radius=1.0, near=0.01)
    assert hit.tolist() == [True, True, False, False]
    assert t_near[:2].tolist() == pytest.approx([2.0, 0.01])
    assert t_far[:2].tolist() == pytest.approx([4.0, 1.5])


def test_stratified_samples_stay_in_their_bins():
    t_near, t_far = torch.tensor([1.0, 0.5]), torch.tensor([3.0, 0.9])
    s, e, t = stratified_samples(t_near, t_far, 8, jitter=True)
    assert s.shape == e.shape == t.shape == (2, 8)
    assert ((s <= t) & (t <= e)).all()
    assert torch.allclose(s[:, 0], t_near) and torch.allclose(e[:, -1], t_far)
    assert torch.allclose(s[:, 1:], e[:, :-1])
    _, _, mid = stratified_samples(t_near, t_far, 8, jitter=False)
    assert torch.allclose(mid, 0.5 * (s + e))


def test_ball_opacity_depth_colour_and_background():
    renderer = ball_renderer(num_samples=128)
    size, distance, fovy = 65, 2.0, 70.0  # wide enough for the corners to miss the unit sphere
    with torch.no_grad():
        out = renderer.render(camera(distance, fovy), size, size)
    assert out.rgb.shape == (1, size, size, 3) and out.background.shape == (1, size, size, 3)
    assert out.opacity.shape == out.depth.shape == (1, size, size, 1)
    c = size // 2
    spacing = 2.0 / 128  # chord of the unit sphere through its centre / samples
    assert out.opacity[0, c, c, 0].item() == pytest.approx(1.0, abs=1e-4)
    assert out.depth[0, c, c, 0].item() == pytest.approx(distance - 0.5, abs=spacing)
    assert torch.allclose(out.rgb[0, c, c], torch.tensor(BALL_COLOR), atol=1e-3)
    for i, j in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
        assert out.opacity[0, i, j, 0].item() == 0.0
        assert out.depth[0, i, j, 0].item() == 0.0
        assert torch.equal(out.rgb[0, i, j], out.background[0, i, j])
    # Rays through the unit sphere that miss the ball: no density, so exactly the background too.
    assert out.opacity[0, c, 3 * size // 4 + 4, 0].item() == 0.0
    assert torch.equal(out.rgb[0, c, 3 * size // 4 + 4], out.background[0, c, 3 * size // 4 + 4])


@pytest.mark.parametrize("distance,fovy,size", [(2.0, 40.0, 64), (1.5, 60.0, 64), (3.0, 30.0, 96)])
def test_ball_silhouette_matches_projection(distance, fovy, size):
    renderer = ball_renderer(num_samples=64)
    with torch.no_grad():
        out = renderer.render(camera(distance, fovy), size, size)
    area = (out.opacity[0, ..., 0] > 0.5).sum().item()
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    expected = focal * math.tan(math.asin(0.5 / distance))  # cone tangent to the ball, centred
    assert math.sqrt(area / math.pi) == pytest.approx(expected, abs=1.0)


def test_camera_inside_the_scene_sphere():
    renderer = ball_renderer(num_samples=256)
    with torch.no_grad():
        out = renderer.render(camera(distance=0.9, fovy=40.0), 33, 33)
    assert out.opacity[0, 16, 16, 0].item() == pytest.approx(1.0, abs=1e-4)
    assert out.depth[0, 16, 16, 0].item() == pytest.approx(0.4, abs=2.0 / 256)


def test_solid_background_colour_per_image():
    renderer = ball_renderer(num_samples=32)
    cams = cameras_from_angles(torch.tensor([0.0, 20.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.0, 2.0]),
                               torch.tensor([70.0, 70.0]))
    colors = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.4, 0.6]])
    with torch.no_grad():
        out = renderer.render(cams, 24, 24, background_color=colors)
    for k in range(2):
        assert torch.equal(out.background[k], colors[k].expand(24, 24, 3))
        assert torch.allclose(out.rgb[k, 0, 0], colors[k])
        assert torch.allclose(out.rgb[k, 12, 12], torch.tensor(BALL_COLOR), atol=1e-3)


def test_chunked_render_equals_unchunked():
    torch.manual_seed(0)
    scene = small_scene()
    renderer = Renderer(NeRFField(scene), Background(scene), RenderConfig(num_samples=24, chunk_rays=10**6),
                        radius=1.0).eval()
    cams = cameras_from_angles(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([1.5, 1.2]),
                               torch.tensor([60.0, 50.0]))
    with torch.no_grad():
        whole = renderer.render(cams, 20, 18)
        chunked = renderer.render(cams, 20, 18, chunk_rays=37)
    for name in ("rgb", "opacity", "depth", "background"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-6), name
    assert whole.samples_per_ray == pytest.approx(chunked.samples_per_ray)
    assert whole.opacity.max() > 0.1  # the blob is visible, so the comparison means something


def test_no_grad_uses_config_chunk_size(monkeypatch):
    renderer = ball_renderer(num_samples=8, chunk_rays=100)
    sizes = []
    original = renderer.render_rays
    monkeypatch.setattr(renderer, "render_rays", lambda o, d: sizes.append(o.shape[0]) or original(o, d))
    with torch.no_grad():
        renderer.render(camera(), 16, 16)
    assert max(sizes) == 100 and sum(sizes) == 256
    sizes.clear()
    renderer.render(camera(), 16, 16)  # gradients enabled: all rays at once
    assert sizes == [256]


def test_gradients_reach_field_and_background():
    torch.manual_seed(0)
    scene = small_scene()
    field, bg = NeRFField(scene), Background(scene)
    renderer = Renderer(field, bg, RenderConfig(num_samples=16), radius=1.0)
    out = renderer.render(camera(distance=1.5, fovy=70.0), 16, 16)
    (out.rgb.mean() + out.opacity.mean()).backward()
    for name, p in list(field.named_parameters()) + list(bg.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_jitters_samples_and_eval_does_not():
    torch.manual_seed(0)
    scene = small_scene()
    renderer = Renderer(NeRFField(scene), Background(scene), RenderConfig(num_samples=8), radius=1.0)
    cam = camera(distance=1.5, fovy=60.0)
    with torch.no_grad():
        a, b = renderer.render(cam, 8, 8).depth, renderer.render(cam, 8, 8).depth
        assert not torch.equal(a, b)
        renderer.eval()
        assert torch.equal(renderer.render(cam, 8, 8).depth, renderer.render(cam, 8, 8).depth)


def test_sampler_choice_on_cpu(caplog):
    cpu = torch.device("cpu")
    assert choose_sampler("auto", cpu)[0] == "occupancy-torch"  # the PyTorch grid (tests/test_render_grid.py)
    assert choose_sampler("occupancy", cpu)[0] == "occupancy-torch"
    assert choose_sampler("stratified", cpu)[0] == "stratified"
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        renderer = Renderer(Ball(), Background(SceneConfig()), RenderConfig(sampler="stratified"), radius=1.0)
    assert renderer.sampler == "stratified"
    assert "stratified" in caplog.text
    assert renderer.state_dict() == {}
    renderer.load_state_dict({})
    renderer.update_occupancy(0)  # no-op without a grid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_occupancy_grid_matches_stratified_on_ball():
    cfg = dict(num_samples_occupancy=1024, occupancy_update_every=1)
    occ = ball_renderer(device="cuda", **cfg)
    occ = Renderer(occ.field, occ.background, RenderConfig(sampler="occupancy", **cfg), radius=1.0)
    strat = ball_renderer(num_samples=512, device="cuda")
    assert occ.sampler == "occupancy"
    for step in range(8):  # a few EMA updates so every cell the ball touches gets sampled
        occ.update_occupancy(step)
    occ.eval()
    cam = camera(distance=2.0, fovy=50.0, device="cuda")
    with torch.no_grad():
        a, b = occ.render(cam, 64, 64), strat.render(cam, 64, 64)
    assert (a.opacity - b.opacity).abs().mean().item() < 0.02
    assert torch.allclose(a.rgb[0, 32, 32], b.rgb[0, 32, 32], atol=1e-2)
    assert a.depth[0, 32, 32, 0].item() == pytest.approx(b.depth[0, 32, 32, 0].item(), abs=0.02)
    assert a.samples_per_ray < b.samples_per_ray  # empty space is skipped
    state = occ.state_dict()
    fresh = Renderer(occ.field, occ.background, RenderConfig(sampler="occupancy", **cfg), radius=1.0).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(fresh.render(cam, 64, 64).opacity, a.opacity)

"""The pure-PyTorch occupancy grid and its marching: nerfacc's update rule (against nerfacc's own code, which
runs on the CPU), the marched samples against a brute-force march with nerfacc's visibility rule, packed
weights against nerfacc's dense weights, and the GPU comparison with nerfacc's CUDA sampling."""

import math

import nerfacc
import pytest
import torch

from sdsbridge.scene.nerf import marching
from sdsbridge.scene.nerf.marching import march, packed_weights, ray_box_intersect
from sdsbridge.scene.nerf.occupancy import OccupancyGrid
from sdsbridge.scene.nerf.renderer import ray_sphere_intersect


def ball_opacity(x, radius=0.5, sigma=50.0, step=0.01):
    """Opacity per step of a ball of density ``sigma`` (what occ_eval_fn returns)."""
    return torch.where(x.norm(dim=-1) < radius, sigma * step, 0.0)


def random_rays(n, seed=0, distance=1.8, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * distance
    targets = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    dirs = torch.nn.functional.normalize(targets - origins, dim=-1)
    return origins.to(device), dirs.to(device)


def test_update_matches_nerfacc_estimator_on_the_cpu():
    ours = OccupancyGrid(radius=1.0, resolution=16).train()
    theirs = nerfacc.OccGridEstimator(roi_aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], resolution=16, levels=1).train()
    for step in [0, 16, 32, 272, 288, 304]:  # warm-up (all cells), then res^3/4 random + occupied cells
        fn = (lambda x: ball_opacity(x, radius=0.5 if step < 200 else 0.3))
        torch.manual_seed(step)
        ours.update_every_n_steps(step, fn, occ_thre=0.01, n=16)
        torch.manual_seed(step)
        theirs.update_every_n_steps(step, fn, occ_thre=0.01, n=16)
        # the same rule, except that a cell drawn twice keeps its largest sample (nerfacc: the last write, which
        # depends on the thread count): ours is never below nerfacc's and differs only on such cells
        differ = ours.occs != theirs.occs
        assert (ours.occs >= theirs.occs).all() and differ.float().mean() < 0.02, step
        assert torch.equal(ours.binaries.flatten()[~differ], theirs.binaries.flatten()[~differ]), step
        ours.occs.copy_(theirs.occs)  # the next update starts from the same grid
        ours.binaries.copy_(theirs.binaries)
    assert 0 < ours.binaries.sum() < ours.cells
    ours.update_every_n_steps(3, lambda x: pytest.fail("updated off the n-step schedule"), n=16)
    with pytest.raises(RuntimeError, match="training"):
        ours.eval().update_every_n_steps(0, ball_opacity)


def test_ema_decays_cells_that_emptied_and_threshold_follows_the_mean():
    grid = OccupancyGrid(radius=1.0, resolution=8).train()
    grid._update(0, lambda x: torch.full((x.shape[0],), 0.5))
    assert grid.binaries.all()
    for _ in range(76):  # 0.5 * 0.95^76 = 0.0101: still above occ_thre 0.01
        grid._update(1, lambda x: torch.zeros(x.shape[0]))
    assert torch.allclose(grid.occs, torch.full_like(grid.occs, 0.5 * 0.95 ** 76)) and grid.binaries.all()
    grid._update(1, lambda x: torch.zeros(x.shape[0]))
    assert not grid.binaries.any()
    # a faint object (opacity 0.004 < occ_thre) still counts: the threshold is min(occ_thre, mean occs)
    grid = OccupancyGrid(radius=1.0, resolution=8).train()
    grid._update(2, lambda x: torch.where(x[:, 0] > 0, 0.004, 0.0))
    assert grid.binaries[0, 4:].all() and not grid.binaries[0, :4].any()


def test_cell_lookup_matches_nerfacc_query():
    grid = OccupancyGrid(radius=0.75, resolution=12)
    grid.binaries = torch.rand(1, 12, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    x = (torch.rand(5000, 3) * 2 - 1) * 0.7499
    expected, _ = nerfacc.grid._query(x, grid.binaries, grid.aabb)
    assert torch.equal(grid.occupied(x), expected)
    grown = grid.dilated_binaries()[0]
    assert grown[grid.binaries[0]].all()  # dilation only adds cells
    i, j, k = (int(v) for v in grid.binaries[0].nonzero()[0])
    assert grown[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2].all()


def brute_force_march(grid, origins, dirs, t_min, t_max, dt, density, eps, alpha_thre):
    """nerfacc's semantics on dense tensors: every step of every ray, occupied + visible ones kept."""
    k = torch.arange(int(math.ceil(float((t_max - t_min).max()) / dt)) + 1)
    t_starts = t_min[:, None] + k * dt
    t_mid = t_starts + 0.5 * dt
    valid = t_mid < t_max[:, None]
    points = origins[:, None] + t_mid[..., None] * dirs[:, None]
    marched = grid.occupied(points) & valid
    sigmas = torch.where(marched, density(points.reshape(-1, 3)).reshape(marched.shape), 0.0)
    trans, alphas = nerfacc.render_transmittance_from_density(t_starts, t_starts + dt, sigmas)
    alpha_thre = min(alpha_thre, grid.occs.mean().item())
    visible = marched & (trans >= eps) & (alphas >= alpha_thre)
    rays, steps = visible.nonzero(as_tuple=True)
    return rays, t_starts[rays, steps]


@pytest.mark.parametrize("budget", [1 << 18, 300 * 8])  # one round (as nerfacc) | many short windows
@pytest.mark.parametrize("alpha_thre,sigma", [(0.0, 30.0), (0.01, 30.0), (0.01, 400.0)])
def test_march_keeps_the_samples_of_a_brute_force_march(alpha_thre, sigma, budget, monkeypatch):
    monkeypatch.setattr(marching, "WINDOW_BUDGET", budget)
    grid = OccupancyGrid(radius=1.0, resolution=32).train()
    noise = torch.Generator().manual_seed(3)

    def density(x):  # a soft ball with a hole pattern, so rays both terminate and pass through
        wave = 0.5 + 0.5 * torch.sin(9 * x[:, 0]) * torch.cos(7 * x[:, 1])
        return sigma * wave * (x.norm(dim=-1) < 0.55)

    torch.manual_seed(0)
    grid._update(0, lambda x: density(x) * 0.01, occ_thre=0.01)
    grid.binaries &= torch.rand(grid.binaries.shape, generator=noise) > 0.1  # random holes: blocks must cope
    origins, dirs = random_rays(300)
    t_min, t_max, hit = ray_sphere_intersect(origins, dirs, 1.0, 0.01)
    origins, dirs, t_min, t_max = origins[hit], dirs[hit], t_min[hit], t_max[hit]
    dt = 1.732 * 2 / 512

    def values(t_starts, t_ends, ray_indices):
        return density(origins[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * dirs[ray_indices])[:, None]

    samples = march(grid, origins, dirs, t_min, t_max, dt, values, early_stop_eps=1e-4, alpha_thre=alpha_thre)
    rays, t_starts = brute_force_march(grid, origins, dirs, t_min, t_max, dt, density, 1e-4, alpha_thre)
    assert samples.ray_indices.numel() > 100
    assert torch.equal(samples.ray_indices, rays)
    assert torch.allclose(samples.t_starts, t_starts, atol=1e-5)
    assert torch.allclose(samples.t_ends - samples.t_starts, torch.full_like(t_starts, dt), atol=1e-6)
    assert torch.allclose(samples.values[:, 0], values(samples.t_starts, samples.t_ends, samples.ray_indices)[:, 0])
    marched = brute_force_march(grid, origins, dirs, t_min, t_max, dt, density, 0.0, 0.0)[0].numel()
    if sigma > 100 and budget < 1 << 18:  # opaque: early stop saves most of nerfacc's density evaluations
        assert samples.evaluated < 0.5 * marched


def test_march_jitters_each_ray_start_within_one_step():
    grid = OccupancyGrid(radius=1.0, resolution=8)
    grid.binaries.fill_(True)
    origins, dirs = random_rays(50, seed=4)
    t_min, t_max, _ = ray_sphere_intersect(origins, dirs, 1.0, 0.01)
    dt = 0.05
    ones = lambda t0, t1, r: torch.ones(t0.shape[0], 1)  # noqa: E731
    torch.manual_seed(0)
    jittered = march(grid, origins, dirs, t_min, t_max, dt, ones, stratified=True, early_stop_eps=0.0)
    first = torch.ones_like(jittered.ray_indices, dtype=torch.bool)
    first[1:] = jittered.ray_indices[1:] != jittered.ray_indices[:-1]
    offset = jittered.t_starts[first] - t_min[jittered.ray_indices[first]]
    assert (offset >= 0).all() and (offset < dt).all() and offset.std() > 0.005
    t_mid = 0.5 * (jittered.t_starts + jittered.t_ends)
    assert (t_mid < t_max[jittered.ray_indices]).all()


def test_packed_weights_equal_nerfacc_dense_weights():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 7])
    sigmas = torch.rand(int(counts.sum()), generator=g) * 40
    t_starts = torch.rand(int(counts.sum()), generator=g)
    t_ends = t_starts + 0.05
    ray_indices = torch.repeat_interleave(torch.arange(5), counts)
    got = packed_weights(t_starts, t_ends, sigmas, ray_indices, 5)
    start = 0
    for n in counts.tolist():
        if n:
            w, _, _ = nerfacc.render_weight_from_density(t_starts[None, start:start + n], t_ends[None, start:start + n],
                                                         sigmas[None, start:start + n])
            assert torch.allclose(got[start:start + n], w[0], atol=1e-6)
        start += n


def test_ray_box_intersect():
    t_in, t_out = ray_box_intersect(torch.tensor([[0.0, 0.0, 3.0], [0.0, 2.0, 3.0]]),
                                    torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]]),
                                    torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]))
    assert t_in[0].item() == pytest.approx(2.0) and t_out[0].item() == pytest.approx(4.0)
    assert t_in[1] >= t_out[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_march_matches_nerfacc_cuda_sampling():
    from sdsbridge.scene.nerf.renderer import nerfacc_cuda_available

    if not nerfacc_cuda_available():
        pytest.skip("nerfacc's CUDA kernels do not load here")
    device = torch.device("cuda")
    ours = OccupancyGrid(radius=1.0, resolution=32).to(device).train()
    theirs = nerfacc.OccGridEstimator(roi_aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], resolution=32).to(device).train()
    torch.manual_seed(0)
    ours._update(0, lambda x: ball_opacity(x, 0.5, 30.0, 0.01))
    theirs.binaries.copy_(ours.binaries)
    theirs.occs.copy_(ours.occs)
    origins, dirs = random_rays(4000, device=device)
    t_min, t_max, hit = ray_sphere_intersect(origins, dirs, 1.0, 0.01)
    origins, dirs, t_min, t_max = origins[hit], dirs[hit], t_min[hit], t_max[hit]
    dt = 1.732 * 2 / 512

    def sigma_fn(t_starts, t_ends, ray_indices):
        x = origins[ray_indices] + (0.5 * (t_starts + t_ends))[:, None] * dirs[ray_indices]
        return 30.0 * (x.norm(dim=-1) < 0.5).float()

    rays, t0, _ = theirs.sampling(origins, dirs, sigma_fn=sigma_fn, t_min=t_min, t_max=t_max, render_step_size=dt,
                                  early_stop_eps=1e-4, alpha_thre=0.01)
    samples = march(ours, origins, dirs, t_min, t_max, dt, lambda a, b, r: sigma_fn(a, b, r)[:, None],
                    early_stop_eps=1e-4, alpha_thre=0.01)
    # nerfacc accumulates t by repeated float32 additions: a sample on a cell face may fall either side
    assert abs(samples.ray_indices.numel() - rays.numel()) <= 0.002 * rays.numel()
    n_ours = torch.bincount(samples.ray_indices, minlength=origins.shape[0])
    n_theirs = torch.bincount(rays.long(), minlength=origins.shape[0])
    assert (n_ours - n_theirs).abs().max() <= 2


@pytest.mark.parametrize("scale,visible", [(1.2, True), (0.8, False)])
def test_coarser_step_keeps_the_alpha_thresholds_density(scale, visible):
    grid = OccupancyGrid(radius=1.0, resolution=8)
    grid.binaries.fill_(True)
    grid.occs.fill_(1.0)  # the mean does not lower alpha_thre
    origins, dirs = random_rays(20, seed=5)
    t_min, t_max, _ = ray_sphere_intersect(origins, dirs, 1.0, 0.01)
    dt = 0.005
    sigma = scale * -math.log(1 - 0.01) / dt  # just above / below the density alpha_thre 0.01 means at dt
    fog = lambda t0, t1, r: torch.full((t0.shape[0], 1), sigma)  # noqa: E731
    for step in (dt, 4 * dt):
        samples = march(grid, origins, dirs, t_min, t_max, step, fog, early_stop_eps=0.0, alpha_thre=0.01,
                        alpha_step=dt)
        assert (samples.ray_indices.numel() > 0) == visible, step


def test_update_is_the_same_for_any_thread_count():
    """Cells drawn more than once get the maximum of their samples, so the grid does not depend on the order in
    which threads write (nerfacc's indexed write did: runs on two threads diverged from step 256 on)."""
    grids = []
    for threads in (1, 2, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        grid = OccupancyGrid(radius=1.0, resolution=32).train()
        for step in range(0, 400, 16):
            torch.manual_seed(step)
            grid.update_every_n_steps(step, lambda x: ball_opacity(x, radius=0.5 + 0.3 * torch.rand(x.shape[0])), n=16)
        torch.set_num_threads(before)
        grids.append(grid.occs.clone())
    assert torch.equal(grids[0], grids[1]) and torch.equal(grids[0], grids[2])

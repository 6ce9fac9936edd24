"""Volume rendering of a field inside a sphere of radius ``radius``, composited over a background.

Three samplers, chosen once per renderer (``RenderConfig.sampler``):

- stratified: ``num_samples`` bins between the ray's entry into and exit from the sphere, one sample per
  bin (jittered inside the bin in training, at its middle in eval); dense (n_rays, n_samples) tensors, so it
  runs on any device.
- occupancy (CUDA only): nerfacc's ``OccGridEstimator`` over the cube [-radius, radius]^3 skips empty
  space; samples are packed (flat tensors with ray indices). The grid is a cache of the field's density,
  refreshed by ``update_occupancy(step)``; it travels in ``state_dict()`` for checkpoints.
- occupancy-torch (any device): the same grid and marching in pure PyTorch (occupancy.py, marching.py),
  used where nerfacc's CUDA kernels cannot run; its grid is saved under the same keys.

Distances ``t`` are in world units along unit-length ray directions.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import nerfacc
import torch
from torch import Tensor, nn

from sdsbridge.scene.cameras import Cameras, camera_rays
from sdsbridge.scene.base import RenderOutput
from sdsbridge.scene.nerf.settings import RenderConfig
from sdsbridge.common.quiet import BACKEND_LOGGER
from sdsbridge.common.devices import module_device
from sdsbridge.scene.nerf.marching import render_with_grid
from sdsbridge.scene.nerf.occupancy import OccupancyGrid, fill_occupancy

logger = logging.getLogger("sdsbridge")
backend_log = logging.getLogger(BACKEND_LOGGER)
"""Which backend a scene built with: said once per command that trains (``quiet_backend`` hushes it elsewhere)."""

OCCUPANCY_EVAL_CHUNK = 1 << 20
"""Points per field call when refreshing the occupancy grid (128^3 cells = 2M points in warm-up)."""
OCCUPANCY_FILL_SUBDIVISIONS = 3
"""Outside training, a grid that was never filled (a checkpoint without one) is built from the field at
this many jittered points per cell and axis (``fill_occupancy``): one point per cell can miss a thin surface."""


def ray_sphere_intersect(origins: Tensor, dirs: Tensor, radius: float, near: float = 0.0
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Where rays cross the sphere of ``radius`` around the origin.

    Args:
        origins: [R, 3] ray origins. dirs: [R, 3] unit directions.
        radius: sphere radius. near: smallest distance returned as entry (for cameras on/inside the sphere).

    Returns:
        (t_near [R], t_far [R], hit [R] bool); ``hit`` is False for rays that miss the sphere or whose
        segment lies entirely behind ``near``. t_near/t_far are meaningless where ``hit`` is False.
    """
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = disc.clamp_min(0.0).sqrt()
    t_near = (-b - root).clamp_min(near)
    t_far = -b + root
    return t_near, t_far, (disc > 0) & (t_far > t_near)


def stratified_samples(t_near: Tensor, t_far: Tensor, n_samples: int, jitter: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Split each ray's [t_near, t_far] into ``n_samples`` equal bins with one sample per bin.

    Args:
        t_near, t_far: [R] segment ends. jitter: sample uniformly inside each bin (else at its middle).

    Returns:
        (t_starts, t_ends, t_samples), each [R, n_samples]: bin ends and sample distances.
    """
    u = torch.linspace(0.0, 1.0, n_samples + 1, device=t_near.device, dtype=t_near.dtype)
    edges = t_near[:, None] + (t_far - t_near)[:, None] * u  # [R, S + 1]
    t_starts, t_ends = edges[:, :-1], edges[:, 1:]
    frac = torch.rand_like(t_starts) if jitter else torch.full_like(t_starts, 0.5)
    return t_starts, t_ends, t_starts + frac * (t_ends - t_starts)


def composite(weights: Tensor, rgbs: Tensor, t_samples: Tensor, ray_indices: Optional[Tensor] = None,
              n_rays: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Accumulate colour, opacity and expected depth along rays.

    Dense input: weights/t_samples [R, S], rgbs [R, S, 3]. Packed input: weights/t_samples [M], rgbs [M, 3],
    with ``ray_indices`` [M] and ``n_rays``. Returns (rgb [R, 3], opacity [R, 1], depth [R, 1]), no background.
    """
    rgb = nerfacc.accumulate_along_rays(weights, rgbs, ray_indices, n_rays)
    opacity = nerfacc.accumulate_along_rays(weights, None, ray_indices, n_rays)
    depth = nerfacc.accumulate_along_rays(weights, t_samples[..., None], ray_indices, n_rays)
    return rgb, opacity, depth


@functools.lru_cache(maxsize=None)
def nerfacc_cuda_available() -> bool:
    """Whether nerfacc's CUDA kernels load (a prebuilt wheel, or a JIT build that needs nvcc). Probed once per
    process: without a prebuilt wheel, the first probe builds the kernels (minutes, said in the log first) and a
    failed build would otherwise be retried by every renderer."""
    backend_log.info("checking nerfacc's CUDA kernels (without a prebuilt wheel nerfacc builds them the first time: "
                "minutes; a build that never ends is a stale 'lock' file in ~/.cache/torch_extensions)")
    try:
        # nerfacc loads (or JIT-builds) its kernels lazily; importing its backend module is the only probe.
        from nerfacc.cuda._backend import _C
    except Exception:  # a failed JIT build raises anything from OSError to RuntimeError
        return False
    return _C is not None


def choose_sampler(requested: str, device: torch.device) -> tuple[str, str]:
    """Resolve ``RenderConfig.sampler`` ('auto' | 'stratified' | 'occupancy' | 'occupancy-torch') for a
    device: 'auto' and 'occupancy' take nerfacc's CUDA grid where its kernels load, else the PyTorch grid.

    Returns (sampler: 'stratified' | 'occupancy' (nerfacc) | 'occupancy-torch', reason for the log).
    """
    if requested == "stratified":
        return "stratified", "render.sampler=stratified"
    if requested == "occupancy-torch":
        return "occupancy-torch", "render.sampler=occupancy-torch"
    if device.type != "cuda":
        return "occupancy-torch", f"no CUDA device (scene on {device}); nerfacc's grid needs CUDA"
    if not nerfacc_cuda_available():
        return "occupancy-torch", ("nerfacc's CUDA kernels are unavailable (no prebuilt wheel, no nvcc to build "
                                   "them); the PyTorch grid is slower than nerfacc's on a GPU")
    return "occupancy", "CUDA device with nerfacc's kernels"


SAMPLER_NAMES = {"stratified": "stratified", "occupancy": "nerfacc CUDA occupancy-grid",
                 "occupancy-torch": "PyTorch occupancy-grid"}


def occupancy_grid(radius: float, cfg: RenderConfig) -> nerfacc.OccGridEstimator:
    """nerfacc's occupancy grid as threestudio builds it: one level of ``cfg.occupancy_resolution``^3 cells
    over the cube [-radius, radius]^3 (a plain module; its kernels run only in ``sampling``/updates)."""
    r = float(radius)
    return nerfacc.OccGridEstimator(roi_aabb=[-r, -r, -r, r, r, r], resolution=cfg.occupancy_resolution, levels=1)


class Renderer:
    """Renders a field (``density(x [M,3]) -> [M]``, ``forward(x) -> (sigma [M], rgb [M,3])``) in world
    units inside the sphere of ``radius``, over a ``background`` (``forward(dirs [...,3]) -> [...,3]``).

    Not an nn.Module: the field and background are trained and checkpointed by their owners; this object's
    ``state_dict()`` holds only the occupancy grid. ``training`` (default True) jitters the samples.
    """

    def __init__(self, field: nn.Module, background: nn.Module, cfg: RenderConfig, radius: float,
                 near: float = 0.01):
        self.field = field
        self.background = background
        self.cfg = cfg
        self.radius = float(radius)
        self.near = float(near)
        self.training = True
        device = module_device(field)
        self.sampler, reason = choose_sampler(cfg.sampler, device)
        backend_log.info("renderer: %s sampler (%s)", SAMPLER_NAMES[self.sampler], reason)
        self.estimator: Optional[nerfacc.OccGridEstimator | OccupancyGrid] = None
        # threestudio's render_step_size, with its 1.732 for sqrt(3): the cube's diagonal / num_samples.
        self.step_size = 1.732 * 2.0 * self.radius / cfg.num_samples_occupancy
        self.eval_step_size = max(self.step_size, 1.732 * 2.0 * self.radius / cfg.occupancy_eval_samples)
        self._grid_ready = False
        self._updates: Optional[OccupancyGrid] = None
        """What refreshes the grid: ours, also for nerfacc's (sharing its buffers). nerfacc's own update writes
        cells drawn twice with a plain indexed write, whose winner CUDA leaves undefined (runs and resumes
        drift apart); ours keeps the largest sample, the same on every device."""
        if self.sampler == "occupancy":
            self.estimator = occupancy_grid(self.radius, cfg).to(device)
            self._updates = OccupancyGrid(self.radius, cfg.occupancy_resolution).to(device)
            self._updates.occs = self.estimator.occs  # the same tensors: updates land in nerfacc's grid
            self._updates.binaries = self.estimator.binaries
        elif self.sampler == "occupancy-torch":
            self.estimator = OccupancyGrid(self.radius, cfg.occupancy_resolution).to(device)

    def train(self, mode: bool = True) -> "Renderer":
        """Jittered samples (True) or deterministic ones (False)."""
        self.training = mode
        if self.estimator is not None:
            self.estimator.train(mode)
        return self

    def eval(self) -> "Renderer":
        return self.train(False)

    # ---- occupancy grid -------------------------------------------------------------------------------
    def _occupancy(self, x: Tensor) -> Tensor:
        """[M, 3] points -> [M] opacity of one marching step, density * step_size."""
        return torch.cat([self.field.density(c) * self.step_size for c in x.split(OCCUPANCY_EVAL_CHUNK)])

    @torch.no_grad()
    def update_occupancy(self, step: int) -> None:
        """Refresh the occupancy grid from the field every ``cfg.occupancy_update_every`` steps with nerfacc's
        ``update_every_n_steps`` rule and its defaults (EMA decay 0.95, all cells during the first 256 steps) on
        density * step_size (threestudio's first-order alpha), threshold ``cfg.occupancy_threshold``; run by
        ``OccupancyGrid`` for both samplers (deterministic). Call once per training step. No-op for the
        stratified sampler."""
        if self.estimator is None:
            return
        every = self.cfg.occupancy_update_every
        if not self._grid_ready:  # fresh, or restored without a grid: fill every cell now
            step, every = 0, 1
        grid = self._updates if self._updates is not None else self.estimator
        grid.train()
        grid.update_every_n_steps(step, self._occupancy, occ_thre=self.cfg.occupancy_threshold, n=every)
        grid.train(self.training)
        self._grid_ready = True

    def state_dict(self) -> dict[str, Tensor]:
        """The occupancy grid as plain tensors ({} for the stratified sampler or an unfilled grid)."""
        if self.estimator is None or not self._grid_ready:
            return {}
        return {"occupancy.occs": self.estimator.occs.detach().clone(),
                "occupancy.binaries": self.estimator.binaries.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the occupancy grid. The grid is a cache of the field: when it is missing or its
        resolution differs from the config it is rebuilt from the field at the next update or render."""
        unexpected = set(state) - {"occupancy.occs", "occupancy.binaries"}
        if unexpected:
            raise KeyError(f"Renderer.load_state_dict: unexpected keys {sorted(unexpected)}")
        if self.estimator is None:
            return
        self._grid_ready = False
        if not state:
            return
        occs, binaries = state["occupancy.occs"], state["occupancy.binaries"]
        if occs.shape != self.estimator.occs.shape or binaries.shape != self.estimator.binaries.shape:
            logger.warning("renderer: saved occupancy grid %s does not match render.occupancy_resolution=%d; "
                           "rebuilding it from the field", tuple(binaries.shape), self.cfg.occupancy_resolution)
            return
        self.estimator.occs.copy_(occs)
        self.estimator.binaries.copy_(binaries)
        self._grid_ready = True

    # ---- rendering ------------------------------------------------------------------------------------
    def _render_stratified(self, origins: Tensor, dirs: Tensor, t_near: Tensor, t_far: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, int]:
        t_starts, t_ends, t_samples = stratified_samples(t_near, t_far, self.cfg.num_samples, self.training)
        points = origins[:, None, :] + t_samples[..., None] * dirs[:, None, :]  # [R, S, 3]
        sigmas, rgbs = self.field(points.reshape(-1, 3))
        sigmas, rgbs = sigmas.reshape(t_samples.shape), rgbs.reshape(*t_samples.shape, 3)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas)
        return (*composite(weights, rgbs, t_samples), t_samples.numel())

    def _render_occupancy(self, origins: Tensor, dirs: Tensor, t_near: Tensor, t_far: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor, int]:
        n_rays = origins.shape[0]

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            t = 0.5 * (t_starts + t_ends)[:, None]
            return self.field.density(origins[ray_indices] + t * dirs[ray_indices])

        # Deliberate difference from threestudio: rays are clipped to the scene sphere (t_min/t_max) as in the
        # stratified sampler, so both samplers see the same segment and nothing is sampled in the cube's
        # corners, where the blob keeps the density near zero anyway. Everything else is threestudio's call.
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins, dirs, sigma_fn=sigma_fn, t_min=t_near, t_max=t_far, render_step_size=self.step_size,
            stratified=self.training, cone_angle=0.0, early_stop_eps=1e-4,
            alpha_thre=self.cfg.occupancy_alpha_threshold)
        if t_starts.numel() == 0:
            zeros = origins.new_zeros(n_rays, 1)
            return zeros.expand(n_rays, 3), zeros, zeros, 0
        t_mid = 0.5 * (t_starts + t_ends)
        sigmas, rgbs = self.field(origins[ray_indices] + t_mid[:, None] * dirs[ray_indices])
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_indices,
                                                           n_rays=n_rays)
        return (*composite(weights, rgbs, t_mid, ray_indices, n_rays), t_starts.numel())

    def render_rays(self, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """Foreground of [R, 3] rays (unit ``dirs``): (rgb [R, 3], opacity [R, 1], depth [R, 1], number of
        samples), not composited over any background. Rays that miss the sphere get zeros."""
        n_rays = origins.shape[0]
        t_near, t_far, hit = ray_sphere_intersect(origins, dirs, self.radius, self.near)
        rgb, opacity, depth = origins.new_zeros(n_rays, 3), origins.new_zeros(n_rays, 1), origins.new_zeros(n_rays, 1)
        idx = hit.nonzero().squeeze(-1)
        if idx.numel() == 0:
            return rgb, opacity, depth, 0
        if self.estimator is not None and not self._grid_ready:
            if self.training:
                self.update_occupancy(0)
            else:
                fill_occupancy(self.estimator, self._occupancy, self.cfg.occupancy_threshold,
                               OCCUPANCY_FILL_SUBDIVISIONS)
                self._grid_ready = True
        if self.sampler == "occupancy":
            out = self._render_occupancy(origins[idx], dirs[idx], t_near[idx], t_far[idx])
        elif self.sampler == "occupancy-torch":
            out = render_with_grid(self.field, self.estimator, origins[idx], dirs[idx], t_near[idx], t_far[idx],
                                   self.step_size if self.training else self.eval_step_size, self.training,
                                   self.cfg.occupancy_alpha_threshold, alpha_step=self.step_size)
        else:
            out = self._render_stratified(origins[idx], dirs[idx], t_near[idx], t_far[idx])
        # index_copy (not in place) keeps the autograd graph to the hit rays' values.
        return (rgb.index_copy(0, idx, out[0]), opacity.index_copy(0, idx, out[1]),
                depth.index_copy(0, idx, out[2]), out[3])

    def render(self, cameras: Cameras, height: int, width: int, background_color: Optional[Tensor] = None,
               chunk_rays: Optional[int] = None) -> RenderOutput:
        """Render N = len(cameras) images of ``height`` x ``width`` pixels.

        Args:
            cameras: N cameras on the field's device.
            background_color: optional [N, 3] (or [3]) solid colour per image in place of the background MLP.
            chunk_rays: render this many rays at a time. Default: all rays at once when gradients are
                enabled (training), ``cfg.chunk_rays`` under ``torch.no_grad()`` (bounds memory at 512^2).
        """
        n = len(cameras)
        origins, dirs = camera_rays(cameras, height, width)  # [N, H, W, 3] each
        if background_color is None:
            background = self.background(dirs)
        else:
            background = background_color.to(dirs).expand(n, 3)[:, None, None, :].expand(n, height, width, 3)
        flat_o, flat_d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        if chunk_rays is None and torch.is_grad_enabled():
            chunk = flat_o.shape[0]
        else:
            chunk = chunk_rays or self.cfg.chunk_rays
        parts = [self.render_rays(o, d) for o, d in zip(flat_o.split(chunk), flat_d.split(chunk))]
        rgb, opacity, depth = (torch.cat([p[i] for p in parts]) for i in range(3))
        shape = (n, height, width)
        rgb, opacity, depth = rgb.reshape(*shape, 3), opacity.reshape(*shape, 1), depth.reshape(*shape, 1)
        return RenderOutput(rgb=rgb + (1.0 - opacity) * background, opacity=opacity, depth=depth,
                            background=background, samples_per_ray=sum(p[3] for p in parts) / flat_o.shape[0])

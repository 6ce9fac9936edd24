"""Ray marching through an ``OccupancyGrid`` in pure PyTorch, with nerfacc's ``OccGridEstimator.sampling``
semantics, and packed volume rendering (flat samples with ray indices) that runs on the CPU.

Samples sit at a fixed step ``dt`` from each ray's start: interval k is [t0 + k dt, t0 + (k+1) dt] (t0 jittered
by U[0, dt) in training), kept only if its midpoint lies before the ray's end, inside an occupied cell, and
is visible: transmittance before it >= ``early_stop_eps`` and its alpha >= ``alpha_thre`` (taken as
min(alpha_thre, mean occs), as nerfacc does).

nerfacc evaluates the density at *every* marched sample, then drops the invisible ones. Here the march goes
front to back in rounds instead (a window of steps per ray that is still alive, wider as fewer rays are
left), and a ray leaves the march as soon as its transmittance falls below ``early_stop_eps``: the samples
kept are the same, but nothing behind an opaque surface is ever evaluated, which is most of the cost on a
CPU. Empty stretches are skipped in blocks of G steps (G dt <= one cell): a block is marched only if the
cell of its midpoint, grown by one cell, is occupied, which cannot miss an occupied sample of the block.

Distances are in world units along unit directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sdsbridge.scene.nerf.occupancy import OccupancyGrid

WINDOW_BUDGET = 1 << 18
"""Candidate steps per round, all alive rays together: a round marches each alive ray min(all its steps,
max(one block, budget / alive rays)) steps. Small batches (training renders) then march in one round, like
nerfacc; large ones (512^2 frames) in short windows that grow as rays terminate."""

ValueFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(t_starts [M], t_ends [M], ray_indices [M]) -> [M, C] values of the samples, column 0 the density."""


@dataclass
class PackedSamples:
    """The visible samples of R rays, sorted by ray, then by distance."""

    ray_indices: Tensor
    """[M] long, which ray each sample is on."""
    t_starts: Tensor
    """[M] interval starts."""
    t_ends: Tensor
    """[M] interval ends."""
    values: Tensor
    """[M, C] what the march's ``value_fn`` returned for them (column 0: density), with their autograd graph."""
    evaluated: int
    """Samples ``value_fn`` was called on while marching (kept or not)."""


def ray_box_intersect(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor]:
    """[R, 3] rays and an aabb [6] (min xyz, max xyz) -> (t_enter [R], t_exit [R]); t_enter >= t_exit
    when the ray misses the box."""
    inv = 1.0 / torch.where(dirs == 0, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (aabb[:3] - origins) * inv, (aabb[3:] - origins) * inv
    return torch.minimum(t0, t1).amax(dim=-1), torch.maximum(t0, t1).amin(dim=-1)


def _next_active_block(active: Tensor) -> Tensor:
    """[R, B] bool -> [R, B + 1] long: for each block b the first active block >= b (B if none)."""
    n_rays, n_blocks = active.shape
    index = torch.arange(n_blocks, device=active.device).expand(n_rays, n_blocks)
    index = torch.where(active, index, torch.full_like(index, n_blocks))
    index = torch.cat([index, index.new_full((n_rays, 1), n_blocks)], dim=1)
    return index.flip(1).cummin(dim=1).values.flip(1)


def march(grid: OccupancyGrid, origins: Tensor, dirs: Tensor, t_min: Tensor, t_max: Tensor, step_size: float,
          value_fn: ValueFn, stratified: bool = False, early_stop_eps: float = 1e-4,
          alpha_thre: float = 0.0, alpha_step: Optional[float] = None) -> PackedSamples:
    """March R rays through ``grid`` and return their visible samples (see the module docstring).

    Args:
        origins, dirs: [R, 3] rays, unit directions. t_min, t_max: [R] the segment to march (clipped to the
            grid's cube here).
        step_size: dt in world units.
        value_fn: evaluated on the samples in occupied cells, front to back, with gradients if they are
            enabled here (so the kept rows of ``values`` can be rendered and differentiated directly; the march
            itself reads them detached).
        stratified: jitter each ray's start by U[0, dt) (one draw per ray, ``torch.rand``).
        alpha_step: the step ``alpha_thre`` (and the grid's occs) refer to, default ``step_size``; marching at
            another step keeps the threshold's density, -log(1 - alpha_thre) / alpha_step.
    """
    grad = torch.is_grad_enabled()
    with torch.no_grad():
        device, n_rays, dt = origins.device, origins.shape[0], float(step_size)
        alpha_thre = min(alpha_thre, grid.occs.mean().item())
        if alpha_step is not None and alpha_thre > 0:
            alpha_thre = 1.0 - (1.0 - alpha_thre) ** (dt / alpha_step)
        box_in, box_out = ray_box_intersect(origins, dirs, grid.aabb)
        start = t_min.clone()
        if stratified:
            start += torch.rand_like(start) * dt
        # Step k's midpoint start + (k + 1/2) dt must lie in [max(start, box_in), min(t_max, box_out)).
        first = ((box_in - start) / dt - 0.5).ceil().clamp_min(0).to(torch.long)
        n_steps = ((torch.minimum(t_max, box_out) - start) / dt - 0.5).ceil().clamp_min(0).to(torch.long)
        max_steps = int(n_steps.max()) if n_rays else 0
        # Blocks of G steps, marched only if the grown cell of their midpoint is occupied (with G = 1 the
        # midpoint is the sample itself and the exact grid decides); not needed when one round covers all.
        block = max(1, int(math.floor(grid.cell_size / dt)))
        n_blocks = -(-max_steps // block)
        next_block = None
        if n_rays * max_steps > WINDOW_BUDGET:
            t_block = start[:, None] + (torch.arange(n_blocks, device=device) * block + 0.5 * block) * dt
            active = grid.occupied(origins[:, None] + t_block[..., None] * dirs[:, None], dilated=block > 1)
            next_block = _next_active_block(active)  # [R, B + 1]
        step = first
        transmittance = torch.ones(n_rays, device=device)
        alive = step < n_steps
    kept, evaluated = [], 0
    while True:
        with torch.no_grad():
            rays = alive.nonzero().squeeze(1)
            if rays.numel() == 0:
                break
            k = step[rays]
            if next_block is not None:
                k = torch.maximum(k, next_block[rays, (k // block).clamp(max=n_blocks)] * block)
                on = k < n_steps[rays]
                alive[rays[~on]] = False
                rays, k = rays[on], k[on]
                if rays.numel() == 0:
                    break
            window = min(max_steps, max(block, WINDOW_BUDGET // rays.numel()))
            steps = k[:, None] + torch.arange(window, device=device)  # [A, W]
            t_mid = start[rays, None] + (steps + 0.5) * dt
            points = origins[rays, None] + t_mid[..., None] * dirs[rays, None]
            row, col = (grid.occupied(points) & (steps < n_steps[rays, None])).nonzero(as_tuple=True)
            ray_idx, k_idx = rays[row], steps[row, col]
            t_starts = start[ray_idx] + k_idx * dt
        if row.numel():
            with torch.set_grad_enabled(grad):
                values = value_fn(t_starts, t_starts + dt, ray_idx)
            with torch.no_grad():
                evaluated += row.numel()
                tau = torch.zeros_like(t_mid)
                tau[row, col] = values[:, 0].detach() * dt
                tau_cum = tau.cumsum(dim=1)
                t_before = transmittance[rays, None] * torch.exp(-(tau_cum - tau))  # exclusive, [A, W]
                visible = t_before[row, col] >= early_stop_eps
                if alpha_thre > 0:
                    visible &= (1.0 - torch.exp(-tau[row, col])) >= alpha_thre
                transmittance[rays] = transmittance[rays] * torch.exp(-tau_cum[:, -1])
            kept.append((ray_idx[visible], k_idx[visible], values[visible]))
        with torch.no_grad():
            step[rays] = k + window
            alive[rays] = (step[rays] < n_steps[rays]) & (transmittance[rays] >= early_stop_eps)

    if not kept:  # (value_fn on no samples: the empty result still hangs on the field's graph)
        none, zeros = torch.zeros(0, dtype=torch.long, device=device), origins.new_zeros(0)
        with torch.set_grad_enabled(grad):
            return PackedSamples(none, zeros, zeros, value_fn(zeros, zeros, none), evaluated)
    ray_idx, k_idx, values = (torch.cat(parts) for parts in zip(*kept))
    if len(kept) > 1:  # rounds emit each ray's samples in order, but rays interleave across rounds
        order = torch.argsort(ray_idx * (max_steps + 1) + k_idx)
        ray_idx, k_idx, values = ray_idx[order], k_idx[order], values[order]
    t_starts = start[ray_idx] + k_idx * dt
    return PackedSamples(ray_idx, t_starts, t_starts + dt, values, evaluated)


def packed_weights(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Volume-rendering weights w_i = T_i (1 - exp(-sigma_i dt_i)), T_i = exp(-sum_{j<i} sigma_j dt_j) over
    the earlier samples of the same ray, for [M] packed samples sorted by ray (nerfacc's
    ``render_weight_from_density`` with ``ray_indices``, which is CUDA-only). Differentiable in ``sigmas``.

    The per-ray exclusive sums come from one cumulative sum over all samples minus its value at each ray's
    first sample, in float64 so that long sums lose no precision.
    """
    tau = sigmas * (t_ends - t_starts)
    if tau.numel() == 0:
        return tau
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # index of each ray's first sample
    exclusive = torch.cumsum(tau.double(), 0) - tau.double()
    # index_select, not exclusive[...]: its backward is index_add (the same sums whatever the thread count), where
    # advanced indexing's index_put(accumulate=True) adds a ray's gradients in a thread-dependent order.
    exclusive = exclusive - exclusive.index_select(0, first[ray_indices])
    return (torch.exp(-exclusive).to(tau.dtype)) * (1.0 - torch.exp(-tau))


def render_packed(samples: PackedSamples, rgbs: Tensor, sigmas: Tensor, n_rays: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Composite packed samples: [M] ``sigmas``, [M, 3] ``rgbs`` -> (rgb [R, 3], opacity [R, 1],
    depth [R, 1]) (depth at the interval midpoints; no background)."""
    if samples.ray_indices.numel() == 0:
        zero = (sigmas.sum() + rgbs.sum()) * 0.0  # (connected to the field's graph when there is one)
        return zero.expand(n_rays, 3), zero.expand(n_rays, 1), zero.expand(n_rays, 1)
    weights = packed_weights(samples.t_starts, samples.t_ends, sigmas, samples.ray_indices, n_rays)
    t_mid = 0.5 * (samples.t_starts + samples.t_ends)
    out = sigmas.new_zeros(n_rays, 5)
    src = torch.cat([weights[:, None] * rgbs, weights[:, None], (weights * t_mid)[:, None]], dim=1)
    out = out.index_add(0, samples.ray_indices, src)
    return out[:, :3], out[:, 3:4], out[:, 4:5]


def render_with_grid(field: nn.Module, grid: OccupancyGrid, origins: Tensor, dirs: Tensor, t_min: Tensor,
                     t_max: Tensor, step_size: float, stratified: bool, alpha_thre: float,
                     alpha_step: Optional[float] = None, early_stop_eps: float = 1e-4
                     ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Render [R, 3] rays of ``field`` (``forward(x [M, 3]) -> (sigma [M], rgb [M, 3])``) through ``grid``:
    (rgb [R, 3], opacity [R, 1], depth [R, 1], samples kept), no background.

    One field pass: the march evaluates density and colour of the samples in occupied cells (with gradients
    when enabled) and the visible ones are composited as they are. (nerfacc evaluates the density first,
    then the field again on the visible samples: on a CPU the per-call cost of a second pass outweighs
    differentiating a few invisible samples.)
    """
    def values(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        t_mid = 0.5 * (t_starts + t_ends)
        sigmas, rgbs = field(origins[ray_indices] + t_mid[:, None] * dirs[ray_indices])
        return torch.cat([sigmas[:, None], rgbs], dim=1)

    samples = march(grid, origins, dirs, t_min, t_max, step_size, values, stratified=stratified,
                    early_stop_eps=early_stop_eps, alpha_thre=alpha_thre, alpha_step=alpha_step)
    sigmas, rgbs = samples.values[:, 0], samples.values[:, 1:4]
    return (*render_packed(samples, rgbs, sigmas, origins.shape[0]), samples.t_starts.numel())

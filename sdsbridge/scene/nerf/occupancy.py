"""An occupancy grid in pure PyTorch (CPU and CUDA), with the semantics of nerfacc's ``OccGridEstimator``
for one level: the fallback when nerfacc's CUDA extension is missing (always on the CPU).

The grid covers the cube [-radius, radius]^3 with ``resolution``^3 cells. ``occs`` [res^3] holds an EMA of
the field's opacity per marching step (density x step size) at jittered points of each cell; ``binaries``
[1, res, res, res] marks the cells above the threshold, and only those are marched (marching.py). Buffer
names, shapes, the update rule and its random draws are nerfacc's (0.5.3 ``estimators/occ_grid.py``), so
a grid saved from either implementation loads into the other.
"""

from __future__ import annotations

import math

from typing import Callable, Union

import nerfacc
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    """One-level occupancy grid over the cube [-radius, radius]^3.

    Args:
        radius: half the cube's side, in world units.
        resolution: cells per axis.
    """

    def __init__(self, radius: float, resolution: int):
        super().__init__()
        r, res = float(radius), int(resolution)
        self.cells = res ** 3
        self.register_buffer("resolution", torch.tensor([res] * 3, dtype=torch.int32))
        self.register_buffer("aabb", torch.tensor([-r, -r, -r, r, r, r]))
        self._cell_size = float(self.aabb[3] - self.aabb[0]) / res  # read once here: on a GPU a read waits for it
        self.register_buffer("occs", torch.zeros(self.cells))
        self.register_buffer("binaries", torch.zeros(1, res, res, res, dtype=torch.bool))
        axes = torch.arange(res)
        coords = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("grid_coords", coords, persistent=False)  # [res^3, 3] cell (i, j, k), row-major

    @property
    def res(self) -> int:
        return int(self.binaries.shape[-1])

    @property
    def cell_size(self) -> float:
        """Side of one cell in world units."""
        return self._cell_size

    # ---- lookups --------------------------------------------------------------------------------------
    def cell_index(self, x: Tensor) -> Tensor:
        """[..., 3] world points -> [...] flat cell index (row-major), clamped to the grid like nerfacc's
        traversal (points outside the cube map to the nearest border cell)."""
        scale = self.res / (self.aabb[3:] - self.aabb[:3])
        ijk = ((x - self.aabb[:3]) * scale).clamp_(0, self.res - 1).to(torch.int32)
        return (ijk[..., 0] * self.res + ijk[..., 1]) * self.res + ijk[..., 2]

    def occupied(self, x: Tensor, dilated: bool = False) -> Tensor:
        """[..., 3] world points -> [...] bool: the point's cell is occupied (``dilated``: the cell or one of
        its 26 neighbours is, a conservative test for any point within one cell of ``x``)."""
        grid = self.dilated_binaries() if dilated else self.binaries
        return grid.reshape(-1)[self.cell_index(x)]

    def dilated_binaries(self) -> Tensor:
        """[1, res, res, res] bool: occupied cells grown by one cell in every direction (3x3x3 max-pool)."""
        grown = F.max_pool3d(self.binaries[None].to(torch.float32), kernel_size=3, stride=1, padding=1)
        return grown[0] > 0

    # ---- updates (nerfacc's rule) ---------------------------------------------------------------------
    @torch.no_grad()
    def update_every_n_steps(self, step: int, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 1e-2,
                             ema_decay: float = 0.95, warmup_steps: int = 256, n: int = 16) -> None:
        """Every ``n`` steps (``step % n == 0``) refresh the grid from ``occ_eval_fn`` ([M, 3] world points
        -> [M] opacity per step): during the first ``warmup_steps`` steps every cell, then res^3/4 uniformly
        drawn cells plus at most as many occupied ones. Training mode only, as nerfacc."""
        if not self.training:
            raise RuntimeError("OccupancyGrid.update_every_n_steps: call it in training mode only")
        if step % n == 0:
            self._update(step, occ_eval_fn, occ_thre, ema_decay, warmup_steps)

    @torch.no_grad()
    def _update(self, step: int, occ_eval_fn: Callable[[Tensor], Tensor], occ_thre: float = 0.01,
                ema_decay: float = 0.95, warmup_steps: int = 256) -> None:
        """occs <- max(decay * occs, opacity at one jittered point per chosen cell); binaries <- occs above
        min(occ_thre, mean occs). Cells with occs < 0 (nerfacc's 'never visible' mark) are skipped."""
        if step < warmup_steps:
            indices = torch.arange(self.cells, device=self.occs.device)[self.occs >= 0.0]
        else:
            indices = self._sample_uniform_and_occupied_cells(self.cells // 4)
        coords = self.grid_coords[indices]
        unit = (coords + torch.rand_like(coords, dtype=torch.float32)) / self.resolution
        x = self.aabb[:3] + unit * (self.aabb[3:] - self.aabb[:3])
        occ = occ_eval_fn(x).squeeze(-1)
        # A cell drawn twice (the draws are with replacement) takes its largest sample: nerfacc's plain indexed
        # write keeps whichever duplicate lands last, which depends on the thread count and varies run to run.
        best = torch.full_like(self.occs, -math.inf).scatter_reduce(0, indices, occ, reduce="amax")
        cells = torch.unique(indices)
        self.occs[cells] = torch.maximum(self.occs[cells] * ema_decay, best[cells])
        thre = torch.clamp(self.occs[self.occs >= 0].mean(), max=occ_thre)
        self.binaries.copy_((self.occs > thre).view(self.binaries.shape))  # in place: a nerfacc grid may share it

    def _sample_uniform_and_occupied_cells(self, n: int) -> Tensor:
        device = self.occs.device
        uniform = torch.randint(self.cells, (n,), device=device)
        uniform = uniform[self.occs[uniform] >= 0.0]
        occupied = torch.nonzero(self.binaries[0].flatten())[:, 0]
        if n < len(occupied):
            occupied = occupied[torch.randint(len(occupied), (n,), device=device)]
        return torch.cat([uniform, occupied], dim=0)


@torch.no_grad()
def fill_occupancy(grid: Union[OccupancyGrid, "nerfacc.OccGridEstimator"], occ_eval_fn: Callable[[Tensor], Tensor],
                   occ_thre: float = 1e-2, subdivisions: int = 3, chunk: int = 1 << 20) -> None:
    """Build a one-level grid (ours or nerfacc's: same buffers) from scratch, outside training: ``occs`` = the
    maximum of ``occ_eval_fn`` over subdivisions^3 points per cell (one jittered point in each sub-cell),
    ``binaries`` = occs above min(occ_thre, mean occs). Training's updates take one point per cell and
    catch thin surfaces over many updates; a grid built once needs the sub-cells to catch them."""
    res = int(grid.binaries.shape[-1])
    aabb = grid.aabb if isinstance(grid, OccupancyGrid) else grid.aabbs[0]
    fine = res * subdivisions
    axes = torch.arange(fine, device=grid.occs.device)
    sub = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), dim=-1).reshape(-1, 3)
    cells = ((sub[:, 0] // subdivisions) * res + sub[:, 1] // subdivisions) * res + sub[:, 2] // subdivisions
    occs = torch.zeros(res ** 3, device=grid.occs.device)
    for part, cell in zip(sub.split(chunk), cells.split(chunk)):
        x = aabb[:3] + (part + torch.rand(part.shape, device=part.device)) / fine * (aabb[3:] - aabb[:3])
        occs.scatter_reduce_(0, cell, occ_eval_fn(x).squeeze(-1), reduce="amax")
    grid.occs.copy_(occs)
    grid.binaries.copy_((occs > torch.clamp(occs.mean(), max=occ_thre)).view(grid.binaries.shape))

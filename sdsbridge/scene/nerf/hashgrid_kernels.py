"""Tensor kernels of the torch hash-grid backend, with tiny-cuda-nn "HashGrid" semantics.

Level l of a grid (L levels, F features per entry, table size T = 2**log2_hashmap_size) has
``scale_l = base * 2**(l * log2(per_level_scale)) - 1`` (float32 arithmetic, as tcnn), ``res_l = ceil(scale_l) + 1``
vertices per axis and ``size_l = min(next_multiple_of_8(res_l**3), T)`` table entries. A point x in [0, 1]^3 is
read at ``p = x * scale_l + 0.5``: the 8 vertices of cell ``floor(p)`` are blended trilinearly by ``frac(p)``.
Vertex c maps to entry ``c_x + c_y * res + c_z * res**2`` when res**3 <= T (dense level), else to
``(c_x * 1 ^ c_y * 2654435761 ^ c_z * 805459861) mod 2**32`` (hashed); either is then taken modulo ``size_l``
(so on dense levels the vertices one past the far face wrap around, as in tcnn). The flat parameter vector holds
the levels one after another, entry-major, then feature: ``params[(offset_l + entry) * F + f]``.

The kernels are plain tensor functions that run eagerly or under ``torch.compile``. Inside, tensors are
level-major with the points of a chunk innermost ([Lg, ..., C]) so compiled loops vectorise over points.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

PRIMES = (1, 2654435761, 805459861)
"""tcnn's "coherent prime" hash factors for x, y, z."""


def grid_levels(n_levels: int, log2_hashmap_size: int, base_resolution: int,
                per_level_scale: float) -> tuple[list[float], list[int], list[int]]:
    """tcnn's level geometry: (scales [L], resolutions [L], offsets [L + 1]); offsets count table entries."""
    log2_scale = np.log2(np.float32(per_level_scale))  # float32 throughout, like tcnn's exp2f / log2(float)
    scales, resolutions, offsets = [], [], [0]
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        res = int(math.ceil(float(scale))) + 1
        size = min((res ** 3 + 7) // 8 * 8, 2 ** log2_hashmap_size)
        scales.append(float(scale))
        resolutions.append(res)
        offsets.append(offsets[-1] + size)
    return scales, resolutions, offsets


def corners(xt: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor, dense: Tensor,
            hash_mask: int) -> tuple[list[Tensor], list[Tensor]]:
    """[3, C] points in [0, 1] (transposed) -> 8 corner entry indices [Lg, C] (int64 rows of the [entries, F]
    table) and 8 trilinear weights [Lg, C], for the Lg levels given by the [Lg] tables (``dense``: unhashed).
    Corner k is the cell vertex offset by (k & 1, k >> 1 & 1, k >> 2 & 1), as in tcnn."""
    p = xt[None] * scale[:, None, None] + 0.5  # [Lg, 3, C]
    cell = p.floor()
    frac = p - cell
    r, size, offset, dense = res[:, None], size[:, None], offset[:, None], dense[:, None]
    # For x in [0, 1] the cell is in [0, res - 1] already; the clamp keeps NaN/inf inputs in bounds.
    c = torch.clamp(cell.long(), min=torch.zeros_like(r)[:, :, None], max=(r - 1)[:, :, None])
    # per-axis terms once; then a corner costs an add or a xor
    along_x = (c[:, 0], c[:, 0] + 1)
    dense_yz = [(c[:, 1] + b1) * r + (c[:, 2] + b2) * (r * r) for b2 in (0, 1) for b1 in (0, 1)]
    hash_yz = [((c[:, 1] + b1) * PRIMES[1]) ^ ((c[:, 2] + b2) * PRIMES[2]) for b2 in (0, 1) for b1 in (0, 1)]
    weight_x = (1.0 - frac[:, 0], frac[:, 0])
    weight_yz = [(frac[:, 1] if b1 else 1.0 - frac[:, 1]) * (frac[:, 2] if b2 else 1.0 - frac[:, 2])
                 for b2 in (0, 1) for b1 in (0, 1)]
    idx, w = [], []
    for k in range(8):
        bx, byz = k & 1, k >> 1
        # tcnn's "modulo size" on dense levels: linear <= res^3 + res^2 + res < 2 * size, so one subtraction
        # does it (integer division is the slowest vector op there is)
        linear = along_x[bx] + dense_yz[byz]
        linear = torch.where(linear >= size, linear - size, linear)
        hashed = (along_x[bx] ^ hash_yz[byz]) & hash_mask  # low bits of the uint32 hash; size = T when hashed
        idx.append(torch.where(dense, linear, hashed) + offset)
        w.append(weight_x[bx] * weight_yz[byz])
    return idx, w


def forward_kernel(xt: Tensor, params: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor,
                   dense: Tensor, hash_mask: int, n_features: int) -> Tensor:
    """[3, C] points, flat params -> [C, Lg * F] features of the Lg given levels (differentiable w.r.t. both
    params and points in plain autograd)."""
    table = params.view(-1, n_features)
    idx, w = corners(xt, scale, res, size, offset, dense, hash_mask)
    out = []
    for f in range(n_features):
        column = table[:, f]
        acc = column[idx[0]] * w[0]
        for k in range(1, 8):
            acc = acc + column[idx[k]] * w[k]
        out.append(acc)  # [Lg, C]
    out = torch.stack(out, 1).permute(2, 0, 1)  # [Lg, F, C] -> [C, Lg, F]
    return out.reshape(xt.shape[1], scale.shape[0] * n_features)


def forward_into(xt: Tensor, params: Tensor, out: Tensor, *tables) -> None:
    """``forward_kernel`` writing into ``out`` [C, Lg * F], a column block of the result (no extra copy)."""
    out.copy_(forward_kernel(xt, params, *tables))


def backward_kernel(xt: Tensor, grad_out: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor,
                    dense: Tensor, hash_mask: int, n_features: int) -> tuple[Tensor, Tensor]:
    """[3, C] points, [C, Lg * F] output grads of the Lg given levels -> (entry indices [Lg, C, 8] int64,
    contributions [Lg, C, 8, F]): d loss / d table[idx] += contribution. A point's 8 corners are adjacent in
    memory order, since x-neighbours often share a cache line (always if dense, for even c_x if hashed)."""
    n_levels = scale.shape[0]
    g = grad_out.view(-1, n_levels, n_features).transpose(0, 1)  # [Lg, C, F]
    idx, w = corners(xt, scale, res, size, offset, dense, hash_mask)
    contrib = torch.stack([wk[..., None] * g for wk in w], 2)  # [Lg, C, 8, F]
    return torch.stack(idx, 2), contrib


def scatter_add(grad: Tensor, idx: Tensor, contrib: Tensor) -> None:
    """grad[idx * F + f] += contrib[..., f] for idx [...], contrib [..., F] and flat grad [entries * F].
    On the CPU index_add_ is a serial loop that releases the GIL: threads may scatter disjoint levels."""
    n_features = contrib.shape[-1]
    if n_features == 2 and grad.device.type == "cpu":  # both features in one add: a float pair is a complex
        target = torch.view_as_complex(grad.view(-1, 2))
        target.index_add_(0, idx.reshape(-1), torch.view_as_complex(contrib).reshape(-1))
    else:
        index = idx[..., None] * n_features + torch.arange(n_features, device=idx.device)
        grad.index_add_(0, index.reshape(-1), contrib.reshape(-1))


@lru_cache(maxsize=None)
def compiled(kernel):
    """One torch.compile wrapper per kernel, shared by all encodings; static shapes, one graph per config.

    Single-threaded code: on a shared 2-core machine 2-thread OpenMP kernels ran 20x slower than one thread
    while other processes were busy (5 s instead of 0.26 s for a 2^19-point forward: each parallel region
    waits for a descheduled thread); parallelism comes from our own threads in the backward pass, where the
    scatter releases the GIL (compiled kernels hold it).
    No bounds checks on gathers/scatters (25% faster): ``corners`` keeps indices in range by construction, and
    the eager kernels, which the tests compare against a reference, keep PyTorch's checks.
    """
    return torch.compile(kernel, dynamic=False, options={"cpp.threads": 1, "assert_indirect_indexing": False})


def pad_rows(t: Tensor, multiple: int) -> Tensor:
    """Zero rows appended to make the row count a multiple of ``multiple``."""
    extra = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


def point_chunks(x: Tensor, chunk: int, pad: bool) -> list[Tensor]:
    """[N, 3] points -> [3, chunk] contiguous blocks (the last zero-padded to full size if ``pad``); transposed
    so kernels read each coordinate contiguously (inductor vectorises only then)."""
    return [xc.t().contiguous() for xc in (pad_rows(x, chunk) if pad else x).split(chunk)]

"""Multi-resolution hash-grid encoding with tiny-cuda-nn "HashGrid" semantics, on two backends.

``backend="tcnn"`` wraps ``tinycudann.Encoding`` (CUDA only); ``backend="torch"`` is a pure-PyTorch
implementation of the same function with the same flat parameter vector, so a state dict moves freely
between the two. Layout (tcnn's): level l has ``scale_l = base * 2**(l * log2(per_level_scale)) - 1``
(float32 arithmetic), ``res_l = ceil(scale_l) + 1`` vertices per axis and
``size_l = min(next_multiple_of_8(res_l**3), 2**log2_hashmap_size)`` table entries of F features.
A point x in [0, 1]^3 is read at ``p = x * scale_l + 0.5``: the 8 vertices of cell ``floor(p)`` are blended
trilinearly by ``frac(p)``. Vertex c maps to entry ``c_x + c_y * res + c_z * res**2`` when res**3 fits the
table (dense), else to ``(c_x * 1 ^ c_y * 2654435761 ^ c_z * 805459861) mod 2**32``; either is then taken
modulo ``size_l`` (so the vertices one past the far face wrap around, as in tcnn). The parameter vector is
levels concatenated, entry-major, then feature: ``params[(offset_l + entry) * F + f]``.

The torch backend on the CPU runs ``torch.compile``d kernels (set ``SDSBRIDGE_COMPILE=0`` to disable;
calls under ``COMPILE_MIN_POINTS`` points stay eager so small runs and tests pay no compile time).
Its fast path differentiates w.r.t. the parameters only; when ``x`` requires grad the call goes through
plain autograd instead (slower, but it gives d/dx and higher derivatives).
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from sdsbridge.errors import UserError

logger = logging.getLogger("sdsbridge")

PRIMES = (1, 2654435761, 805459861)
"""tcnn's "coherent prime" hash factors for x, y, z."""
COMPILE_AFTER_POINTS = 2 ** 21
"""CPU: an encoding compiles its kernels after this many points went through it (eagerly), so short runs and
tests never pay the compile time (~5-20 s cold, ~1-3 s from inductor's disk cache), long runs soon do."""
COMPILE_MIN_POINTS = 4096
"""CPU: calls with fewer points stay eager (compiled kernels pad every call to a whole chunk)."""
CHUNK_POINTS = {"cpu": 65536, "cpu-compiled-forward": 32768, "cpu-compiled-backward": 8192, "cuda": 2 ** 18}
"""Points per kernel call (measured best on 2 cores); compiled kernels see only this shape (the last chunk is
zero-padded), so they compile once."""
TCNN_INSTALL_HINT = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


def grid_levels(n_levels: int, log2_hashmap_size: int, base_resolution: int,
                per_level_scale: float) -> tuple[list[float], list[int], list[int]]:
    """tcnn's level geometry: (scales [L], resolutions [L], offsets [L + 1]); offsets count table entries."""
    log2_scale = np.log2(np.float32(per_level_scale))  # float32 throughout, like tcnn's exp2f/log2
    scales, resolutions, offsets = [], [], [0]
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        res = int(math.ceil(float(scale))) + 1
        size = min((res ** 3 + 7) // 8 * 8, 2 ** log2_hashmap_size)
        scales.append(float(scale))
        resolutions.append(res)
        offsets.append(offsets[-1] + size)
    return scales, resolutions, offsets


def _tcnn_import():
    """(module, None) if tinycudann imports, else (None, one-line reason)."""
    try:
        import tinycudann
    except Exception as exc:  # ImportError, or OSError/RuntimeError from its CUDA extension
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"tinycudann is not importable ({type(exc).__name__}: {detail})"
    return tinycudann, None


def resolve_backend(requested: str, device) -> tuple[str, str]:
    """Pick the hash-grid backend: returns (``"torch"`` or ``"tcnn"``, a short human reason).

    ``"auto"`` takes tcnn when ``device`` is CUDA and tinycudann imports, else torch. Asking for ``"tcnn"``
    where it cannot run raises UserError.
    """
    device = torch.device(device if device is not None else "cpu")
    if requested == "torch":
        return "torch", "requested"
    if requested not in ("auto", "tcnn"):
        raise UserError(f"scene.backend: '{requested}' is not one of auto, torch, tcnn")
    if device.type != "cuda":
        if requested == "tcnn":
            raise UserError(f"scene.backend: 'tcnn' needs a CUDA device, but the device is {device.type} "
                            "(use scene.backend=torch or auto)")
        return "torch", f"device is {device.type}; tcnn needs CUDA"
    _, problem = _tcnn_import()
    if problem is not None:
        if requested == "tcnn":
            raise UserError(f"scene.backend: 'tcnn' requested but {problem}; install it with "
                            f"`{TCNN_INSTALL_HINT}` or use scene.backend=torch")
        return "torch", f"{problem}; install it for speed: {TCNN_INSTALL_HINT}"
    return "tcnn", "CUDA device and tinycudann importable" if requested == "auto" else "requested"


# ---------------------------------------------------------------------------------------------------------
# Kernels: plain tensor functions, run eagerly or through torch.compile. Layout inside is level-major
# ([L, ..., C], C = points in the chunk innermost) so compiled loops vectorise over points.

def _corners(x: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor, dense: Tensor,
             hash_mask: int) -> tuple[list[Tensor], list[Tensor]]:
    """[C, 3] points -> 8 corner entry indices [Lg, C] (int64, rows of the [entries, F] table) and 8 trilinear
    weights [Lg, C], for the Lg levels described by the [Lg] tables (``dense``: index without hashing).
    Corner k is the cell vertex offset by bits (k & 1, k >> 1 & 1, k >> 2 & 1), as in tcnn."""
    p = x.t()[None] * scale[:, None, None] + 0.5  # [Lg, 3, C]
    cell = p.floor()
    frac = p - cell
    c = cell.long()  # tcnn uses (uint32)(int)floor(p); indices only depend on it modulo 2**32, as here
    r, size, offset, dense = res[:, None], size[:, None], offset[:, None], dense[:, None]
    # per-axis terms once, then 2 ops per corner and index kind
    dense_x = (c[:, 0], c[:, 0] + 1)
    dense_yz = [(c[:, 1] + b1) * r + (c[:, 2] + b2) * (r * r) for b2 in (0, 1) for b1 in (0, 1)]
    hash_yz = [((c[:, 1] + b1) * PRIMES[1]) ^ ((c[:, 2] + b2) * PRIMES[2]) for b2 in (0, 1) for b1 in (0, 1)]
    weight_x = (1.0 - frac[:, 0], frac[:, 0])
    weight_yz = [(frac[:, 1] if b1 else 1.0 - frac[:, 1]) * (frac[:, 2] if b2 else 1.0 - frac[:, 2])
                 for b2 in (0, 1) for b1 in (0, 1)]
    idx, w = [], []
    for k in range(8):
        bx, byz = k & 1, k >> 1
        linear = ((dense_x[bx] + dense_yz[byz]) & 0xFFFFFFFF) % size
        hashed = (dense_x[bx] ^ hash_yz[byz]) & hash_mask
        idx.append(torch.where(dense, linear, hashed) + offset)
        w.append(weight_x[bx] * weight_yz[byz])
    return idx, w


def _forward_kernel(x: Tensor, params: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor,
                    dense: Tensor, hash_mask: int, n_features: int) -> Tensor:
    """[C, 3] points, flat params -> [C, Lg * F] features of the Lg given levels (differentiable w.r.t. both
    in plain autograd)."""
    table = params.view(-1, n_features)
    idx, w = _corners(x, scale, res, size, offset, dense, hash_mask)
    out = []
    for f in range(n_features):
        column = table[:, f]
        acc = column[idx[0]] * w[0]
        for k in range(1, 8):
            acc = acc + column[idx[k]] * w[k]
        out.append(acc)  # [L, C]
    out = torch.stack(out, 1)  # [Lg, F, C]
    return out.permute(2, 0, 1).reshape(x.shape[0], -1)


def _forward_into(x: Tensor, params: Tensor, out: Tensor, *tables) -> None:
    """``_forward_kernel`` writing into ``out`` [C, Lg * F] (a column block of the result, so no extra copy)."""
    out.copy_(_forward_kernel(x, params, *tables))


def _backward_kernel(x: Tensor, grad_out: Tensor, scale: Tensor, res: Tensor, size: Tensor, offset: Tensor,
                     dense: Tensor, hash_mask: int, n_features: int) -> tuple[Tensor, Tensor]:
    """[C, 3] points, [C, Lg * F] output grads of the Lg given levels -> (entry indices [Lg, C, 8], int64;
    contributions [Lg, C, 8, F]): d loss / d table[idx] += contribution. A point's 8 corners are adjacent in
    memory order, since x-neighbours often share a cache line (always when dense, when c_x is even if hashed)."""
    n_levels = scale.shape[0]
    g = grad_out.view(-1, n_levels, n_features).transpose(0, 1)  # [Lg, C, F]
    idx, w = _corners(x, scale, res, size, offset, dense, hash_mask)
    contrib = torch.stack([wk[..., None] * g for wk in w], 2)  # [Lg, C, 8, F]
    return torch.stack(idx, 2), contrib


@lru_cache(maxsize=None)
def _compiled(kernel):
    """One torch.compile wrapper per kernel, shared by all encodings (static shapes: one graph per config).

    Single-threaded code: on a shared 2-core machine OpenMP kernels were up to 10x slower than one thread
    whenever other processes were busy (every parallel region waits for a descheduled thread); parallelism
    comes from our own threads in the backward pass instead, where the scatter releases the GIL.
    """
    return torch.compile(kernel, dynamic=False, options={"cpp.threads": 1})


def _scatter_add(grad: Tensor, idx: Tensor, contrib: Tensor) -> None:
    """grad[idx * F + f] += contrib[..., f] for idx [...], contrib [..., F] and grad flat [entries * F].

    index_add_ on the CPU is a serial loop that releases the GIL, so threads can scatter disjoint levels.
    """
    n_features = contrib.shape[-1]
    if n_features == 2:  # both features in one add: a pair of floats is one complex number
        torch.view_as_complex(grad.view(-1, 2)).index_add_(0, idx.reshape(-1), torch.view_as_complex(contrib).reshape(-1))
    else:
        index = idx[..., None] * n_features + torch.arange(n_features, device=idx.device)
        grad.index_add_(0, index.reshape(-1), contrib.reshape(-1))


def _pad_rows(t: Tensor, multiple: int) -> Tensor:
    """Zero rows appended to make the row count a multiple of ``multiple``."""
    extra = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


class _HashGridFunction(torch.autograd.Function):
    """Fast path of the torch backend: differentiates w.r.t. the parameters only (HashGridEncoding sends
    calls that need d/dx elsewhere). The backward pass recomputes the corners instead of storing them."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, encoding: "HashGridEncoding") -> Tensor:
        compiled = encoding._use_compiled(x)
        ctx.save_for_backward(x)
        ctx.encoding, ctx.compiled = encoding, compiled
        return encoding._encode(x, params, compiled)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (x,) = ctx.saved_tensors
        return None, ctx.encoding._grad_params(x, grad_out.contiguous(), ctx.compiled), None


class HashGridEncoding(nn.Module):
    """Hash-grid encoding of points in [0, 1]^3 (tcnn HashGrid semantics; see the module docstring).

    Args:
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale: tcnn's grid.
        backend: "auto" (tcnn on CUDA when importable, else torch), "torch" or "tcnn".
        device: where ``params`` lives (default: the CPU).

    Attributes:
        params: flat float32 parameters [n_params], tcnn layout, initialised uniform in [-1e-4, 1e-4].
        n_output_dims: n_levels * n_features_per_level.
        backend: the resolved backend, "torch" or "tcnn".
        level_resolutions, level_offsets: per level, vertices per axis and first table entry.
        compile_kernels: torch backend on the CPU: use torch.compile'd kernels for large calls
            (default on unless SDSBRIDGE_COMPILE=0); falls back to eager if compilation fails.
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.447269237440378, backend: str = "auto",
                 device=None):
        super().__init__()
        device = torch.device(device if device is not None else "cpu")
        self.n_levels, self.n_features_per_level = int(n_levels), int(n_features_per_level)
        self.log2_hashmap_size, self.base_resolution = int(log2_hashmap_size), int(base_resolution)
        self.per_level_scale = float(per_level_scale)
        self.n_output_dims = self.n_levels * self.n_features_per_level
        scales, self.level_resolutions, offsets = grid_levels(
            self.n_levels, self.log2_hashmap_size, self.base_resolution, self.per_level_scale)
        self.level_offsets = offsets[:-1]
        dense = [r ** 3 <= 2 ** self.log2_hashmap_size for r in self.level_resolutions]
        sizes = [offsets[i + 1] - offsets[i] for i in range(self.n_levels)]
        for name, values, dtype in (("_scale", scales, torch.float32), ("_res", self.level_resolutions, torch.int64),
                                    ("_size", sizes, torch.int64), ("_offset", self.level_offsets, torch.int64),
                                    ("_dense", dense, torch.bool)):
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), persistent=False)
        n_params = offsets[-1] * self.n_features_per_level
        self.params = nn.Parameter(torch.empty(n_params, dtype=torch.float32, device=device).uniform_(-1e-4, 1e-4))
        self.compile_kernels = os.environ.get("SDSBRIDGE_COMPILE", "1") != "0"
        self.compile_after_points = COMPILE_AFTER_POINTS
        self._points_seen = 0
        self._kernels_seen: set = set()
        self.backend, reason = resolve_backend(backend, device)
        if backend == "auto":
            logger.info("hash grid backend: %s (%s)", self.backend, reason)
        # Plain attribute, not a submodule: the state dict must hold `params` only (same as the torch backend).
        object.__setattr__(self, "_tcnn", self._make_tcnn() if self.backend == "tcnn" else None)

    def extra_repr(self) -> str:
        return (f"levels={self.n_levels}, features={self.n_features_per_level}, log2_T={self.log2_hashmap_size}, "
                f"base={self.base_resolution}, scale={self.per_level_scale}, params={self.params.numel()}, "
                f"backend={self.backend}")

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3] points in [0, 1]^3 (any leading shape) -> [N, n_output_dims] features, level-major.

        Points outside [0, 1]^3 are read like tcnn does (grid indices wrap around); callers should clamp.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, 3).to(self.params.dtype).contiguous()
        if self._tcnn is not None:
            out = self._tcnn_forward(x)
        elif x.requires_grad and torch.is_grad_enabled():
            tables = self._tables(0, self.n_levels)
            out = torch.cat([_forward_kernel(xc, self.params, *tables) for xc in x.split(self._chunk_points(False, False))])
        else:
            out = _HashGridFunction.apply(x, self.params, self)
        return out.reshape(*lead, self.n_output_dims)

    # -- torch backend -----------------------------------------------------------------------------------
    def _tables(self, lo: int, hi: int) -> tuple:
        """Kernel arguments after (x, data) for levels lo..hi-1."""
        return (self._scale[lo:hi].to(self.params.dtype), self._res[lo:hi], self._size[lo:hi],
                self._offset[lo:hi], self._dense[lo:hi], 2 ** self.log2_hashmap_size - 1, self.n_features_per_level)

    def _chunk_points(self, compiled: bool, backward: bool) -> int:
        if self.params.device.type != "cpu":
            return CHUNK_POINTS["cuda"]
        if not compiled:
            return CHUNK_POINTS["cpu"]
        return CHUNK_POINTS["cpu-compiled-backward" if backward else "cpu-compiled-forward"]

    def _use_compiled(self, x: Tensor) -> bool:
        if not (self.compile_kernels and x.device.type == "cpu" and x.dtype == torch.float32
                and x.shape[0] >= COMPILE_MIN_POINTS and hasattr(torch, "compile")):
            return False
        self._points_seen += x.shape[0]
        return self._points_seen > self.compile_after_points

    def _encode(self, x: Tensor, params: Tensor, compiled: bool) -> Tensor:
        """Fast forward: [N, 3] points -> [N, L * F] features, chunk by chunk, level by level."""
        n, n_features, chunk = x.shape[0], self.n_features_per_level, self._chunk_points(compiled, False)
        x = _pad_rows(x, chunk) if compiled else x  # compiled kernels see one shape only
        out = torch.empty(x.shape[0], self.n_output_dims, dtype=x.dtype, device=x.device)
        kernel = self._kernel(_forward_into, compiled)

        def levels(lo: int, hi: int) -> None:
            tables, cols = self._tables(lo, hi), slice(lo * n_features, hi * n_features)
            for start in range(0, x.shape[0], chunk):
                kernel(x[start:start + chunk], params, out[start:start + chunk, cols], *tables)

        self._over_levels(levels, 1)
        return out[:n]

    def _grad_params(self, x: Tensor, grad_out: Tensor, compiled: bool) -> Tensor:
        """Fast backward: [N, 3] points and [N, L * F] output grads -> d loss / d params [n_params]."""
        n_features, chunk = self.n_features_per_level, self._chunk_points(compiled, True)
        if compiled:  # zero output grads on the padding rows: they add nothing
            x, grad_out = _pad_rows(x, chunk), _pad_rows(grad_out, chunk)
        grad = torch.zeros(self.params.shape, dtype=grad_out.dtype, device=grad_out.device)
        kernel = self._kernel(_backward_kernel, compiled)

        def levels(lo: int, hi: int) -> None:
            tables, cols = self._tables(lo, hi), slice(lo * n_features, hi * n_features)
            for start in range(0, x.shape[0], chunk):
                _scatter_add(grad, *kernel(x[start:start + chunk], grad_out[start:start + chunk, cols], *tables))

        # levels own disjoint parts of grad, so threads taking whole levels need no atomics
        self._over_levels(levels, min(torch.get_num_threads(), self.n_levels) if compiled else 1)
        return grad

    def _over_levels(self, fn, n_threads: int) -> None:
        """Call fn(lo, hi) for level groups: one level at a time on the CPU, so its table (up to 2^19 entries)
        stays in cache while all points use it (random access to all levels at once is several times slower);
        all levels at once elsewhere. The first group runs alone: it compiles the kernel, if needed."""
        n_levels = self.n_levels
        groups = [(lo, lo + 1) for lo in range(n_levels)] if self.params.device.type == "cpu" else [(0, n_levels)]
        fn(*groups[0])
        if n_threads > 1:
            with ThreadPoolExecutor(n_threads) as pool:
                for future in [pool.submit(fn, *group) for group in groups[1:]]:
                    future.result()
        else:
            for group in groups[1:]:
                fn(*group)

    def _kernel(self, kernel, compiled: bool):
        """``kernel`` itself, or its compiled version that logs its first (compiling) call and falls back to
        ``kernel`` for good if compilation fails."""
        if not (compiled and self.compile_kernels):
            return kernel
        fn = _compiled(kernel)

        def call(*args):
            if not self.compile_kernels:
                return kernel(*args)
            if kernel in self._kernels_seen:
                return fn(*args)
            try:
                start = time.perf_counter()
                result = fn(*args)
            except Exception as exc:  # no C++ compiler, unsupported platform, inductor bug...
                self.compile_kernels = False
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                logger.warning("hash grid: torch.compile failed (%s: %s); using eager kernels",
                               type(exc).__name__, detail)
                return kernel(*args)
            self._kernels_seen.add(kernel)
            logger.info("hash grid: %s compiled/loaded in %.1f s", kernel.__name__.strip("_"),
                        time.perf_counter() - start)
            return result

        return call

    # -- tcnn backend ------------------------------------------------------------------------------------
    def _make_tcnn(self):
        tcnn, _ = _tcnn_import()
        config = {"otype": "HashGrid", "n_levels": self.n_levels, "n_features_per_level": self.n_features_per_level,
                  "log2_hashmap_size": self.log2_hashmap_size, "base_resolution": self.base_resolution,
                  "per_level_scale": self.per_level_scale}
        encoding = tcnn.Encoding(3, config, dtype=torch.float32)
        if encoding.params.numel() != self.params.numel():
            raise RuntimeError(f"tcnn HashGrid has {encoding.params.numel()} parameters, expected "
                               f"{self.params.numel()}: the layouts disagree")
        return encoding

    def _tcnn_forward(self, x: Tensor) -> Tensor:
        # tcnn's module reads its `params` attribute; point it at ours so the state dict, optimiser and
        # gradients all see one tensor. The tcnn module is deliberately not a registered submodule.
        self._tcnn.params = self.params
        return self._tcnn(x.float().contiguous()).float()

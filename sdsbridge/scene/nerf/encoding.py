"""Multi-resolution hash-grid encoding with tiny-cuda-nn "HashGrid" semantics, on two backends.

``backend="tcnn"`` wraps ``tinycudann.Encoding`` (CUDA only); ``backend="torch"`` computes the same function
with the same flat parameter vector in PyTorch (see hashgrid_kernels.py for the layout), so a state dict moves
freely between the two. Points are clamped to [0, 1]^3 on both backends.

The torch backend on the CPU switches to ``torch.compile``d kernels once an encoding has seen
``COMPILE_AFTER_POINTS`` points, so short runs and tests pay no compile time (set ``SDSBRIDGE_COMPILE=0`` to
stay eager). Its fast path differentiates w.r.t. the parameters only; a call whose ``x`` requires grad goes
through plain autograd instead (slower, but it gives d/dx and higher derivatives).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from sdsbridge.common.errors import UserError
from sdsbridge.common.quiet import BACKEND_LOGGER
from sdsbridge.scene.nerf import hashgrid_kernels as K

logger = logging.getLogger("sdsbridge")
backend_log = logging.getLogger(BACKEND_LOGGER)
"""Which backend a scene built with: said once per command that trains (``quiet_backend`` hushes it elsewhere)."""

COMPILE_AFTER_POINTS = 2 ** 21
"""CPU: an encoding compiles its kernels after this many points went through it eagerly (a few seconds'
worth), so short runs and tests never pay the compile time (~10-20 s cold, ~2-5 s from inductor's disk
cache), while long runs soon do."""
COMPILE_AFTER_CALLS = 200
"""... or after this many calls (of COMPILE_MIN_POINTS points or more): the occupancy-grid sampler sends a few
thousand points per training step, and would reach 2M points only after hundreds of steps."""
COMPILE_MIN_POINTS = 4096
"""CPU: calls with fewer points do not count towards compiling; once compiled, calls of any size use the
compiled kernels (padded to a whole chunk they still beat eager kernels, even at 500 points)."""
compile_seconds = 0.0
"""Seconds this process spent compiling (or loading) hash-grid kernels: the training loop keeps that one-off
time out of its progress bar's rate, so the ETA stays honest."""
CHUNK_POINTS = {"cpu": 65536, "cpu-compiled-forward": 8192, "cpu-compiled-backward": 8192, "cuda": 2 ** 18}
"""Points per kernel call (best measured on 2 cores); compiled kernels only ever see this shape (the last
chunk is zero-padded), so each compiles once. A forward chunk of 8192 runs 2^18 points as fast as 32768 did
and wastes less on the small calls of the occupancy-grid sampler (a few thousand samples per training step)."""
TCNN_INSTALL_HINT = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


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
    """Hash-grid encoding of points in [0, 1]^3 (tcnn HashGrid semantics, see hashgrid_kernels.py).

    Args:
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale: tcnn's grid.
        backend: "auto" (tcnn on CUDA when importable, else torch), "torch" or "tcnn".
        device: where ``params`` lives (default: the CPU).

    Attributes:
        params: flat float32 parameters [n_params], tcnn layout, initialised uniform in [-1e-4, 1e-4].
        n_output_dims: n_levels * n_features_per_level.
        backend: the resolved backend, "torch" or "tcnn".
        level_resolutions, level_offsets: per level, vertices per axis and first table entry.
        compile_kernels, compile_after_points: torch backend on the CPU: compile the kernels (default: unless
            SDSBRIDGE_COMPILE=0) once this many points went through; falls back to eager if compiling fails.
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
        scales, self.level_resolutions, offsets = K.grid_levels(
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
        self._calls_seen = 0
        self._counting = True
        self._kernels_seen: set = set()
        self.backend, reason = resolve_backend(backend, device)
        if backend == "auto":
            backend_log.info("hash grid backend: %s (%s)", self.backend, reason)
        # Plain attribute, not a submodule: the state dict must hold `params` only (same as the torch backend).
        object.__setattr__(self, "_tcnn", self._make_tcnn() if self.backend == "tcnn" else None)

    def extra_repr(self) -> str:
        return (f"levels={self.n_levels}, features={self.n_features_per_level}, log2_T={self.log2_hashmap_size}, "
                f"base={self.base_resolution}, scale={self.per_level_scale}, params={self.params.numel()}, "
                f"backend={self.backend}")

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3] points in [0, 1]^3 (any leading shape) -> [N, n_output_dims] features, level-major.

        Points outside are clamped to the cube (tcnn would let its grid indices wrap around there).
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, 3).to(self.params.dtype).clamp(0.0, 1.0).contiguous()
        if self._tcnn is not None:
            out = self._tcnn_forward(x)
        elif x.requires_grad and torch.is_grad_enabled():
            tables = self._tables(0, self.n_levels)
            chunk = self._chunk_points(False, False)
            out = torch.cat([K.forward_kernel(xc.t(), self.params, *tables) for xc in x.split(chunk)])
        else:
            out = _HashGridFunction.apply(x, self.params, self)
        return out.reshape(*lead, self.n_output_dims)

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Calls inside do not count towards compiling the kernels (``compile_after_points``), so they never start a
        compile either: a live viewer's renders leave the step at which a run compiles where it was."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

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
                and hasattr(torch, "compile")):
            return False
        if x.shape[0] >= COMPILE_MIN_POINTS and self._counting:
            self._points_seen += x.shape[0]
            self._calls_seen += 1
        return self._points_seen > self.compile_after_points or self._calls_seen > COMPILE_AFTER_CALLS

    def _encode(self, x: Tensor, params: Tensor, compiled: bool) -> Tensor:
        """Fast forward: [N, 3] points -> [N, L * F] features, chunk by chunk, level by level."""
        n, n_features, chunk = x.shape[0], self.n_features_per_level, self._chunk_points(compiled, False)
        chunks = K.point_chunks(x, chunk, pad=compiled)  # compiled kernels see one shape only
        out = torch.empty(n + (-n % chunk if compiled else 0), self.n_output_dims, dtype=x.dtype, device=x.device)
        kernel = self._kernel(K.forward_into, compiled)

        def levels(lo: int, hi: int) -> None:
            tables, cols = self._tables(lo, hi), slice(lo * n_features, hi * n_features)
            for i, xt in enumerate(chunks):
                kernel(xt, params, out[i * chunk:i * chunk + xt.shape[1], cols], *tables)

        self._over_levels(levels, 1)
        return out[:n]

    def _grad_params(self, x: Tensor, grad_out: Tensor, compiled: bool) -> Tensor:
        """Fast backward: [N, 3] points and [N, L * F] output grads -> d loss / d params [n_params]."""
        n_features, chunk = self.n_features_per_level, self._chunk_points(compiled, True)
        chunks = K.point_chunks(x, chunk, pad=compiled)
        if compiled:  # zero output grads on the padding rows: they add nothing
            grad_out = K.pad_rows(grad_out, chunk)
        grad = torch.zeros(self.params.shape, dtype=grad_out.dtype, device=grad_out.device)
        kernel = self._kernel(K.backward_kernel, compiled)

        def levels(lo: int, hi: int) -> None:
            tables, cols = self._tables(lo, hi), slice(lo * n_features, hi * n_features)
            for i, xt in enumerate(chunks):
                K.scatter_add(grad, *kernel(xt, grad_out[i * chunk:i * chunk + xt.shape[1], cols], *tables))

        # levels own disjoint parts of grad, so threads taking whole levels need no atomics
        self._over_levels(levels, min(torch.get_num_threads(), self.n_levels) if compiled else 1)
        return grad

    def _over_levels(self, fn, n_threads: int) -> None:
        """Call fn(lo, hi) for level groups: one level at a time on the CPU, so its table (up to 2^19 entries)
        stays in cache while all points use it (all levels at once measured 1.7x slower); all levels at once
        elsewhere. The first group runs alone: it compiles the kernel, if needed, before threads share it."""
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
        fn = K.compiled(kernel)

        def call(*args):
            if not self.compile_kernels:
                return kernel(*args)
            if kernel in self._kernels_seen:
                return fn(*args)
            if not self._kernels_seen:
                logger.info("hash grid: compiling its CPU kernels, once per run (seconds; cached on disk for later "
                            "runs)")
            start = time.perf_counter()
            try:
                result = fn(*args)
            except Exception as exc:  # no C++ compiler, unsupported platform, inductor bug...
                self.compile_kernels = False
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                logger.warning("hash grid: torch.compile failed (%s: %s); using eager kernels",
                               type(exc).__name__, detail)
                return kernel(*args)
            finally:
                global compile_seconds
                compile_seconds += time.perf_counter() - start
            self._kernels_seen.add(kernel)
            logger.info("hash grid: %s compiled/loaded in %.1f s", kernel.__name__,
                        time.perf_counter() - start)
            return result

        return call

    # -- tcnn backend ------------------------------------------------------------------------------------
    def _make_tcnn(self):
        tcnn, _ = _tcnn_import()
        # Interpolation and hash named although they are tcnn's defaults: the torch backend implements exactly these.
        config = {"otype": "HashGrid", "n_levels": self.n_levels, "n_features_per_level": self.n_features_per_level,
                  "log2_hashmap_size": self.log2_hashmap_size, "base_resolution": self.base_resolution,
                  "per_level_scale": self.per_level_scale, "interpolation": "Linear", "hash": "CoherentPrime"}
        encoding = tcnn.Encoding(3, config, dtype=torch.float32)  # fp32 params and outputs (tcnn has had dtype= since 2022)
        if encoding.params.numel() != self.params.numel():
            raise RuntimeError(f"tcnn HashGrid has {encoding.params.numel()} parameters, expected "
                               f"{self.params.numel()}: the layouts disagree")
        if encoding.n_output_dims != self.n_output_dims:
            raise RuntimeError(f"tcnn HashGrid gives {encoding.n_output_dims} features, expected {self.n_output_dims}")
        return encoding

    def _tcnn_forward(self, x: Tensor) -> Tensor:
        # tcnn's module reads its `params` attribute; point it at ours so the state dict, optimiser and
        # gradients all see one tensor. The tcnn module is deliberately not a registered submodule.
        self._tcnn.params = self.params
        return self._tcnn(x.float().contiguous()).float()

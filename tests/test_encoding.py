"""Hash-grid encoding: tcnn level geometry, vertex values, gradients (finite differences), the fast path
against a naive per-level reference, backend resolution, and (GPU only) tcnn against torch."""

import itertools
import logging
import math

import numpy as np
import pytest
import torch

import sdsbridge.scene.nerf.encoding as encoding_module
import sdsbridge.scene.nerf.hashgrid_kernels as kernels_module
from sdsbridge.common.errors import UserError
from sdsbridge.scene.nerf.encoding import HashGridEncoding, resolve_backend

DEFAULT = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
               per_level_scale=1.447269237440378)
# levels 0-1 dense (4^3 = 64 and 8^3 = 512 <= 512 entries), levels 2-3 hashed (16^3, 32^3 > 512)
SMALL = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=2.0)
PRIMES = (1, 2654435761, 805459861)


def expected_geometry(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale):
    """tcnn's formula, written out independently: (scales, resolutions, table sizes, offsets) per level.
    Scales in float32 like tcnn's exp2f(l * log2(s)) * base - 1."""
    scales, resolutions, sizes, offsets = [], [], [], [0]
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * np.log2(np.float32(per_level_scale)))  # float32 ops
        scale = float(scale * np.float32(base_resolution) - np.float32(1.0))
        res = math.ceil(scale) + 1
        size = min(-(-res ** 3 // 8) * 8, 2 ** log2_hashmap_size)
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
    return scales, resolutions, sizes, offsets


def vertex_index(vertex, res, size, log2_hashmap_size):
    """Table entry (within its level) of an integer grid vertex, tcnn's rule in Python integers."""
    a, b, c = (v % 2 ** 32 for v in vertex)
    if res ** 3 <= 2 ** log2_hashmap_size:
        index = (a + b * res + c * res * res) % 2 ** 32
    else:
        index = ((a * PRIMES[0]) ^ (b * PRIMES[1]) ^ (c * PRIMES[2])) % 2 ** 32
    return index % size


def reference_corners(x, grid):
    """Naive per-level, per-corner loop: yields (level, table rows [N], trilinear weights [N] float64).
    Points are clamped to [0, 1]^3, as the encoding does."""
    scales, resolutions, sizes, offsets = expected_geometry(**grid)
    log2_t = grid["log2_hashmap_size"]
    for level, (scale, res, size) in enumerate(zip(scales, resolutions, sizes)):
        p = x.detach().double().clamp(0.0, 1.0) * scale + 0.5
        cell = torch.floor(p)
        frac = p - cell
        cell = cell.long().numpy().astype(np.uint64) & np.uint64(0xFFFFFFFF)  # tcnn's uint32 coordinates
        for corner in itertools.product((0, 1), repeat=3):
            v = (cell + np.array(corner, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
            if res ** 3 <= 2 ** log2_t:
                idx = (v[:, 0] + v[:, 1] * np.uint64(res) + v[:, 2] * np.uint64(res * res)) & np.uint64(0xFFFFFFFF)
            else:  # uint64 products wrap modulo 2^64, so their low 32 bits are exact
                idx = (v[:, 0] ^ (v[:, 1] * np.uint64(PRIMES[1])) ^ (v[:, 2] * np.uint64(PRIMES[2])))
                idx = idx & np.uint64(0xFFFFFFFF)
            rows = torch.from_numpy((idx % np.uint64(size)).astype(np.int64)) + offsets[level]
            weight = torch.ones(len(x), dtype=torch.float64)
            for d in range(3):
                weight = weight * (frac[:, d] if corner[d] else 1.0 - frac[:, d])
            yield level, rows, weight


def reference_encoding(x, params, grid):
    """[N, 3] points -> [N, L * F] features, from reference_corners."""
    n_features = grid["n_features_per_level"]
    table = params.detach().double().view(-1, n_features)
    out = torch.zeros(len(x), grid["n_levels"], n_features, dtype=torch.float64)
    for level, rows, weight in reference_corners(x, grid):
        out[:, level] += weight[:, None] * table[rows]
    return out.view(len(x), -1)


def reference_param_grad(x, grad_out, grid):
    """d sum(encoding(x) * grad_out) / d params, accumulated corner by corner."""
    n_features = grid["n_features_per_level"]
    grad = torch.zeros(expected_geometry(**grid)[3][-1], n_features, dtype=torch.float64)
    g = grad_out.double().view(len(x), -1, n_features)
    for level, rows, weight in reference_corners(x, grid):
        grad.index_add_(0, rows, weight[:, None] * g[:, level])
    return grad.view(-1)


def make(grid, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    enc = HashGridEncoding(**grid, backend="torch").to(dtype)
    enc.compile_kernels = False
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0)  # large values so that indexing mistakes show
    return enc


def test_default_geometry_matches_tcnn_formula():
    scales, resolutions, sizes, offsets = expected_geometry(**DEFAULT)
    enc = HashGridEncoding(**DEFAULT, backend="torch")
    assert enc.level_resolutions == resolutions
    assert enc.level_offsets == offsets[:-1]
    assert enc.params.numel() == offsets[-1] * 2 == 12_599_920
    assert enc.n_output_dims == 32 and enc.backend == "torch"
    assert enc.params.dtype == torch.float32 and enc.params.abs().max() <= 1e-4
    # float64 arithmetic gives the same resolutions for this grid (no scale is near an integer)
    assert resolutions == [math.ceil(16 * 1.447269237440378 ** l - 1) + 1 for l in range(16)]
    assert resolutions[:5] == [16, 24, 34, 49, 71] and sum(r ** 3 <= 2 ** 19 for r in resolutions) == 5
    assert list(enc.state_dict()) == ["params"]


@pytest.mark.parametrize("grid, level, vertex", [
    (DEFAULT, 2, (5, 31, 17)),          # dense level (34^3 <= 2^19)
    (DEFAULT, 11, (700, 13, 402)),      # hashed level
    (SMALL, 1, (7, 1, 3)),              # dense, table exactly full
    (SMALL, 3, (30, 2, 19)),            # hashed
])
def test_vertex_values_are_the_stored_parameters(grid, level, vertex):
    scales, resolutions, sizes, offsets = expected_geometry(**grid)
    enc = make(grid)
    n_features = grid["n_features_per_level"]
    row = offsets[level] + vertex_index(vertex, resolutions[level], sizes[level], grid["log2_hashmap_size"])
    with torch.no_grad():
        enc.params.zero_()
        enc.params[row * n_features:(row + 1) * n_features] = torch.tensor([0.75, -2.0])
    x = (torch.tensor([vertex], dtype=torch.float64) - 0.5) / scales[level]
    y = enc(x)[0].view(-1, n_features)
    expected = torch.zeros_like(y)
    expected[level] = torch.tensor([0.75, -2.0])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_fast_path_matches_reference():
    """Random points (some outside [0, 1]^3, some on its faces, where dense indices wrap), forward and grads."""
    for grid in (SMALL, DEFAULT):
        enc = make(grid)
        torch.manual_seed(1)
        x = torch.rand(3000, 3, dtype=torch.float64) * 1.1 - 0.05
        x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.999999, 1e-7, 1.0]])
        grad_out = torch.randn(3000, enc.n_output_dims, dtype=torch.float64)
        y = enc(x)
        (y * grad_out).sum().backward()
        torch.testing.assert_close(y, reference_encoding(x, enc.params, grid), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(enc.params.grad, reference_param_grad(x, grad_out, grid), atol=1e-10, rtol=1e-10)


def test_float32_default_grid_matches_reference():
    enc = make(DEFAULT, dtype=torch.float32)
    x = torch.rand(2000, 3)
    y = enc(x)
    assert y.dtype == torch.float32 and y.shape == (2000, 32)
    torch.testing.assert_close(y.double(), reference_encoding(x, enc.params, DEFAULT),
                               atol=1e-3, rtol=0)  # float32 frac(p): ~1e-4 at res 4096


def test_param_gradient_matches_finite_differences():
    enc = make(SMALL)
    x = torch.rand(50, 3, dtype=torch.float64)
    grad_out = torch.randn(50, enc.n_output_dims, dtype=torch.float64)
    (enc(x) * grad_out).sum().backward()
    eps = 1e-6
    for seed in range(3):
        direction = torch.randn(enc.params.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            base = enc.params.clone()
            enc.params.copy_(base + eps * direction)
            plus = (enc(x) * grad_out).sum()
            enc.params.copy_(base - eps * direction)
            minus = (enc(x) * grad_out).sum()
            enc.params.copy_(base)
        assert math.isclose((plus - minus).item() / (2 * eps), (enc.params.grad * direction).sum().item(),
                            rel_tol=1e-7, abs_tol=1e-9)


def test_input_gradient_matches_finite_differences():
    enc = make(SMALL)
    x = (torch.rand(8, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(enc, (x,), eps=1e-7, atol=1e-5)
    # the x-differentiable route gives the same parameter gradients as the fast path
    grad_out = torch.randn(8, enc.n_output_dims, dtype=torch.float64)
    (enc(x) * grad_out).sum().backward()
    slow = enc.params.grad.clone()
    enc.params.grad = None
    (enc(x.detach()) * grad_out).sum().backward()
    torch.testing.assert_close(enc.params.grad, slow)


def test_threaded_padded_path_matches_eager(monkeypatch):
    """The compiled-path orchestration (padding to whole chunks, level threads) with eager kernels."""
    monkeypatch.setattr(kernels_module, "compiled", lambda kernel: kernel)
    monkeypatch.setattr(encoding_module, "COMPILE_MIN_POINTS", 1)
    monkeypatch.setitem(encoding_module.CHUNK_POINTS, "cpu-compiled-forward", 2048)
    monkeypatch.setitem(encoding_module.CHUNK_POINTS, "cpu-compiled-backward", 512)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    enc = make(SMALL, dtype=torch.float32)
    x, grad_out = torch.rand(5000, 3), torch.randn(5000, enc.n_output_dims)
    (enc(x) * grad_out).sum().backward()
    eager_y, eager_grad = enc(x), enc.params.grad.clone()
    enc.params.grad = None
    enc.compile_kernels, enc.compile_after_points = True, 0
    y = enc(x)
    (y * grad_out).sum().backward()
    assert enc._kernels_seen  # the "compiled" route ran
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(enc.params.grad, eager_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_kernels_match_reference():
    """The real torch.compile path (10-20 s of compiling) on the default grid."""
    enc = make(DEFAULT, dtype=torch.float32)
    enc.compile_kernels, enc.compile_after_points = True, 0
    x, grad_out = torch.rand(40_000, 3), torch.randn(40_000, 32)
    y = enc(x)
    (y * grad_out).sum().backward()
    assert enc.compile_kernels and len(enc._kernels_seen) == 2
    torch.testing.assert_close(y.double(), reference_encoding(x, enc.params, DEFAULT), atol=1e-3, rtol=0)
    torch.testing.assert_close(enc.params.grad.double(), reference_param_grad(x, grad_out, DEFAULT),
                               atol=1e-3, rtol=1e-3)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(kernel):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(kernels_module, "compiled", broken)
    monkeypatch.setattr(encoding_module, "COMPILE_MIN_POINTS", 1)
    enc = make(SMALL, dtype=torch.float32)
    enc.compile_kernels, enc.compile_after_points = True, 0
    x = torch.rand(100, 3)
    with caplog.at_level(logging.WARNING, logger="sdsbridge"):
        y = enc(x)
    assert not enc.compile_kernels and "torch.compile failed" in caplog.text
    torch.testing.assert_close(y.double(), reference_encoding(x, enc.params, SMALL),
                               atol=1e-5, rtol=0)


def test_shapes_and_state_dict_round_trip():
    a, b = make(SMALL, dtype=torch.float32, seed=0), make(SMALL, dtype=torch.float32, seed=1)
    x = torch.rand(2, 5, 3)
    assert a(x).shape == (2, 5, 8)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_backend_resolution(caplog):
    backend, reason = resolve_backend("auto", "cpu")
    assert backend == "torch" and reason
    assert resolve_backend("torch", torch.device("cpu"))[0] == "torch"
    with pytest.raises(UserError, match="tcnn"):
        resolve_backend("tcnn", "cpu")
    with pytest.raises(UserError, match="backend"):
        resolve_backend("cuda-magic", "cpu")
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        enc = HashGridEncoding(**SMALL, backend="auto")
    assert enc.backend == "torch" and "hash grid backend: torch" in caplog.text
    with pytest.raises(UserError):
        HashGridEncoding(**SMALL, backend="tcnn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tcnn_and_torch_backends_agree():
    pytest.importorskip("tinycudann")
    fast = HashGridEncoding(**DEFAULT, backend="tcnn", device="cuda")
    slow = HashGridEncoding(**DEFAULT, backend="torch", device="cuda")
    with torch.no_grad():
        fast.params.uniform_(-1.0, 1.0)
    slow.load_state_dict(fast.state_dict())
    x = torch.rand(100_000, 3, device="cuda")
    grad_out = torch.randn(100_000, 32, device="cuda")
    y_fast, y_slow = fast(x), slow(x)
    # float32 frac(p) differs by up to an ulp of p (5e-4 at res 4096: fma vs mul+add); index errors would be O(1)
    torch.testing.assert_close(y_fast, y_slow, atol=5e-3, rtol=0)
    (y_fast * grad_out).sum().backward()
    (y_slow * grad_out).sum().backward()
    assert (fast.params.grad - slow.params.grad).norm() <= 1e-3 * slow.params.grad.norm()
    assert list(fast.state_dict()) == ["params"]


def test_first_compile_is_announced_and_its_time_counted(monkeypatch, caplog):
    """Before the one-off compile the log says so (no silent stall), and the seconds it took are counted
    (the training loop keeps them out of the progress bar's rate)."""
    import time as time_module

    def slow_to_compile(kernel):
        def call(*args):
            time_module.sleep(0.05)
            return kernel(*args)
        return call

    monkeypatch.setattr(kernels_module, "compiled", slow_to_compile)
    monkeypatch.setattr(encoding_module, "COMPILE_MIN_POINTS", 1)
    enc = make(SMALL, dtype=torch.float32)
    enc.compile_kernels, enc.compile_after_points = True, 0
    before = encoding_module.compile_seconds
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        enc(torch.rand(100, 3))
    messages = [r.getMessage() for r in caplog.records]
    assert "compiling its CPU kernels, once per run" in messages[0] and "compiled/loaded" in messages[-1]
    assert encoding_module.compile_seconds - before >= 0.05

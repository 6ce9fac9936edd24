"""Hash-grid encoding throughput: million points per second, forward + backward and forward alone.

    python scripts/bench_encoding.py                      # default grid, 2^19 points, auto backend
    python scripts/bench_encoding.py --device cuda --backend torch --repeats 10

Timings exclude the first call, which is reported on its own (on the CPU it includes torch.compile; run with
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) to time a cold compile rather than a load from inductor's disk cache).
The best of ``--repeats`` runs is reported, as other processes make single runs noisy.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from sdsbridge.scene.nerf.encoding import HashGridEncoding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(encoding: HashGridEncoding, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[float, float]:
    """One forward and one backward; returns their wall times in seconds."""
    device = x.device
    encoding.params.grad = None
    _sync(device)
    t0 = time.perf_counter()
    y = encoding(x)
    _sync(device)
    t1 = time.perf_counter()
    y.backward(grad_out)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--points", type=int, default=2 ** 19)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "tcnn"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="torch backend: eager kernels only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    torch.manual_seed(0)
    encoding = HashGridEncoding(backend=args.backend, device=device)
    encoding.compile_after_points = 0  # compile on the first call, so it can be timed on its own
    if args.no_compile:
        encoding.compile_kernels = False
    x = torch.rand(args.points, 3, device=device)
    grad_out = torch.randn(args.points, encoding.n_output_dims, device=device)

    first = sum(_step(encoding, x, grad_out))
    fwd, bwd = zip(*(_step(encoding, x, grad_out) for _ in range(args.repeats)))
    best_fwd, best_total = min(fwd), min(f + b for f, b in zip(fwd, bwd))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    compiled = bool(encoding._kernels_seen)
    print(f"hash grid: {encoding.n_levels} levels x {encoding.n_features_per_level} features, "
          f"T=2^{encoding.log2_hashmap_size}, {encoding.params.numel():,} params; backend {encoding.backend}"
          f"{' (compiled)' if compiled else ''}; {where}; torch {torch.__version__}")
    print(f"points {args.points:,}, best of {args.repeats}")
    print(f"  fwd+bwd  {args.points / best_total / 1e6:7.3f} M points/s  ({best_total * 1e3:.1f} ms)")
    print(f"  forward  {args.points / best_fwd / 1e6:7.3f} M points/s  ({best_fwd * 1e3:.1f} ms)")
    print(f"  first fwd+bwd {first:.2f} s (one-off setup incl. compilation: ~{max(first - best_total, 0.0):.2f} s)")


if __name__ == "__main__":
    main()

"""Time one training render (forward + backward) of the default scene on the CPU.

    python scripts/bench_render.py [--resolution 64] [--samples 64] [--repeats 5] [--warmup 10]

Default SceneConfig (hash grid backend 'auto' -> torch on the CPU), batch 1, stratified sampler, random
training cameras, after ``--warmup`` untimed renders. Prints the median and best time per render in ms and
the rays/s and samples/s they give.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdsbridge.cameras import sample_cameras
from sdsbridge.config import CameraConfig, RenderConfig, SceneConfig
from sdsbridge.nerf.background import Background
from sdsbridge.nerf.field import NeRFField
from sdsbridge.nerf.renderer import Renderer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64, help="image height and width in pixels")
    parser.add_argument("--samples", type=int, default=64, help="stratified samples per ray")
    parser.add_argument("--repeats", type=int, default=5, help="timed renders")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed renders first (the torch hash grid compiles its CPU kernels once ~2M points "
                             "went through it: 8 renders at 64x64x64)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    scene = SceneConfig()
    field, background = NeRFField(scene), Background(scene)
    renderer = Renderer(field, background, RenderConfig(sampler="stratified", num_samples=args.samples),
                        radius=scene.radius)
    generator = torch.Generator().manual_seed(0)
    params = list(field.parameters()) + list(background.parameters())

    def step() -> float:
        cameras = sample_cameras(CameraConfig(), 1, generator)
        start = time.perf_counter()
        out = renderer.render(cameras, args.resolution, args.resolution)
        (out.rgb.mean() + out.opacity.mean()).backward()
        elapsed = time.perf_counter() - start
        for p in params:
            p.grad = None
        return elapsed

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.repeats)]
    rays = args.resolution ** 2
    median, best = statistics.median(times), min(times)
    print(f"render fwd+bwd {args.resolution}x{args.resolution}, {args.samples} samples/ray, "
          f"encoding {field.encoding.backend}, {scene.n_levels} levels, 2^{scene.log2_hashmap_size} table, "
          f"{torch.get_num_threads()} threads")
    print(f"median {median * 1e3:.1f} ms  best {best * 1e3:.1f} ms  "
          f"{rays / median:,.0f} rays/s  {rays * args.samples / median / 1e6:.3f} M samples/s (median)")


if __name__ == "__main__":
    main()

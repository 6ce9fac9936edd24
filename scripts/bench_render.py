"""Render speed on the CPU: the dense stratified sampler and the PyTorch occupancy grid side by side.

    python scripts/bench_render.py                    # 512x512 eval frames of a trained default-size scene
    python scripts/bench_render.py --run runs/NAME    # ... of a trained run's scene (its checkpoint's grid)
    python scripts/bench_render.py --training         # one training render (fwd + bwd) at 64x64, both samplers

Frames (default): the scene is a default-size field (SceneConfig(): 16 levels, 2^19 table) fitted to the
torus by direct supervision (nerf/shape_fit.py, ``--fit-steps``; a trained scene in about a minute, instead of
an hour of score distillation on 2 cores), or ``--run``'s. Both samplers render the same eval-orbit views over
white, alternating, after one untimed warm-up render each; the grid is the checkpoint's or, for the fitted
field, built from it (the renderer's fill). Prints seconds per frame, field samples per ray, the speed-up and
the PSNR between the two renders (the grid's quality target: >= 35 dB); ``--reference-samples N`` adds a dense
render with N samples per ray and both samplers' PSNR against it.

Training (``--training``): random training cameras, forward + backward of one render per step, after
``--warmup`` untimed steps, both samplers on the same fitted field; prints ms per render and the ratio.
The torch hash grid's compiled CPU kernels are switched on from the start (no eager warm-up phase).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from sdsbridge.scene.cameras import Cameras, orbit_cameras, sample_cameras
from sdsbridge.config.schema import CameraConfig, RenderConfig, SceneConfig
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.scene.nerf.renderer import Renderer
from sdsbridge.testing.shape_fit import fit_field_to_shape

WHITE = torch.ones(3)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def fitted_scene(steps: int) -> tuple[NeRFField, Background, CameraConfig, RenderConfig, float, dict]:
    """(field, background, cameras, render settings, radius, renderer state {}) of a default-size field fitted
    to the torus."""
    scene = SceneConfig(background_color=[1.0, 1.0, 1.0])
    field = NeRFField(scene)
    field.encoding.compile_after_points = 0
    started = time.perf_counter()
    loss = fit_field_to_shape(field, "torus", steps=steps, points=1 << 14)
    print(f"scene: default-size field (16 levels, 2^19 table) fitted to the torus, {steps} steps, loss {loss:.4f}, "
          f"{time.perf_counter() - started:.0f} s")
    return field.eval(), Background(scene).eval(), CameraConfig(), RenderConfig(), scene.radius, {}


def run_scene(run: str) -> tuple[NeRFField, Background, CameraConfig, RenderConfig, float, dict]:
    from sdsbridge.training.checkpoint import load_trained_scene

    scene, config, step = load_trained_scene(Path(run), torch.device("cpu"))
    scene.field.encoding.compile_after_points = 0
    print(f"scene: {run} at step {step} ({config.scene.n_levels} levels, 2^{config.scene.log2_hashmap_size} table, "
          f"radius {config.scene.radius}), sampler it trained with: {scene.renderer.sampler}")
    return (scene.field, scene.background, config.cameras, config.render, config.scene.radius,
            scene.renderer.state_dict())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_frames(args: argparse.Namespace) -> None:
    field, background, cameras, render, radius, grid_state = (run_scene(args.run) if args.run
                                                              else fitted_scene(args.fit_steps))
    dense = Renderer(field, background, replace(render, sampler="stratified", num_samples=args.samples), radius).eval()
    grid = Renderer(field, background, replace(render, sampler="occupancy-torch"), radius)
    grid.load_state_dict(grid_state if "occupancy.binaries" in grid_state else {})
    grid.eval()
    views = orbit_cameras(cameras, args.frames)
    res = args.resolution
    with torch.no_grad():
        for renderer in (dense, grid):  # compile the kernels, fill the grid
            renderer.render(_view(views, 0), 64, 64, background_color=WHITE)
        times = {"dense": [], "grid": []}
        renders = {"dense": [], "grid": []}
        spr = {"dense": [], "grid": []}
        for i in range(args.frames):
            view = _view(views, i)
            for name, renderer in (("dense", dense), ("grid", grid)):
                seconds, out = timed(lambda: renderer.render(view, res, res, background_color=WHITE))
                times[name].append(seconds)
                renders[name].append(out.rgb)
                spr[name].append(out.samples_per_ray)
    rgb = {name: torch.cat(images) for name, images in renders.items()}
    occupied = grid.estimator.binaries.float().mean().item()
    print(f"{args.frames} frame(s) of {res}x{res}, {torch.get_num_threads()} threads; grid "
          f"{grid.cfg.occupancy_resolution}^3 ({100 * occupied:.1f}% occupied), step {grid.eval_step_size:.5f} "
          f"(training step {grid.step_size:.5f})")
    for name in ("dense", "grid"):
        label = f"stratified, {args.samples} samples/ray" if name == "dense" else "occupancy grid (PyTorch)"
        print(f"  {name:5s} {statistics.median(times[name]):7.2f} s/frame  {statistics.mean(spr[name]):6.1f} "
              f"samples/ray  ({label})")
    ratio = statistics.median(times["dense"]) / statistics.median(times["grid"])
    print(f"speed-up grid vs dense: {ratio:.1f}x (target >= 5x)")
    print(f"PSNR grid vs dense: {psnr(rgb['grid'], rgb['dense']):.1f} dB (target >= 35 dB)")
    if args.reference_samples:
        ref = Renderer(field, background, replace(render, sampler="stratified", num_samples=args.reference_samples),
                       radius).eval()
        with torch.no_grad():
            truth = torch.cat([ref.render(_view(views, i), res, res, background_color=WHITE).rgb
                               for i in range(args.frames)])
        for name in ("dense", "grid"):
            print(f"PSNR {name} vs dense with {args.reference_samples} samples/ray: {psnr(rgb[name], truth):.1f} dB")


def _view(cameras: Cameras, i: int) -> Cameras:
    return Cameras(cameras.c2w[i:i + 1], cameras.fovy[i:i + 1], cameras.elevation[i:i + 1],
                   cameras.azimuth[i:i + 1], cameras.distance[i:i + 1], cameras.labels[i:i + 1])


def bench_training(args: argparse.Namespace) -> None:
    field, background, cameras, render, radius, grid_state = (run_scene(args.run) if args.run
                                                              else fitted_scene(args.fit_steps))
    field.train()
    dense = Renderer(field, background, replace(render, sampler="stratified", num_samples=args.samples), radius)
    grid = Renderer(field, background, replace(render, sampler="occupancy-torch"), radius)
    grid.load_state_dict(grid_state if "occupancy.binaries" in grid_state else {})
    generator = torch.Generator().manual_seed(0)
    params = list(field.parameters()) + list(background.parameters())
    res = args.train_resolution

    def step(renderer: Renderer) -> tuple[float, float]:
        cams = sample_cameras(cameras, 1, generator)
        start = time.perf_counter()
        out = renderer.render(cams, res, res)
        (out.rgb.mean() + out.opacity.mean()).backward()
        elapsed = time.perf_counter() - start
        for p in params:
            p.grad = None
        return elapsed, out.samples_per_ray

    results = {"dense": [], "grid": []}
    for i in range(args.warmup + args.repeats):
        for name, renderer in (("dense", dense), ("grid", grid)):
            out = step(renderer)
            if i >= args.warmup:
                results[name].append(out)
    print(f"training render fwd+bwd {res}x{res}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    for name, rows in results.items():
        print(f"  {name:5s} {1e3 * statistics.median(r[0] for r in rows):8.1f} ms  "
              f"{statistics.mean(r[1] for r in rows):6.1f} samples/ray")
    ratio = statistics.median(r[0] for r in results["dense"]) / statistics.median(r[0] for r in results["grid"])
    print(f"speed-up grid vs dense: {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run directory or checkpoint (default: a fitted default-size scene)")
    parser.add_argument("--fit-steps", type=int, default=150, help="fitting steps of the default scene")
    parser.add_argument("--resolution", type=int, default=512, help="frame height and width in pixels")
    parser.add_argument("--frames", type=int, default=2, help="eval-orbit views timed (median reported)")
    parser.add_argument("--samples", type=int, default=64, help="dense sampler: samples per ray")
    parser.add_argument("--reference-samples", type=int, default=0, help="also compare with this dense render")
    parser.add_argument("--training", action="store_true", help="time training renders (fwd+bwd) instead")
    parser.add_argument("--train-resolution", type=int, default=64, help="training render size")
    parser.add_argument("--repeats", type=int, default=5, help="training: timed steps per sampler")
    parser.add_argument("--warmup", type=int, default=3, help="training: untimed steps per sampler first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (bench_training if args.training else bench_frames)(args)


if __name__ == "__main__":
    main()

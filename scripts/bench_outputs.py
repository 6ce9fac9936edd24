"""Standalone `export`, `video` and `eval` against the same work at the end of `train`, side by side.

    python scripts/bench_outputs.py [--run RUN] [--mesh-resolution 128] [--frames 30] [--video-resolution 256]
                                    [--views 8]

Without --run, trains the CPU demo (configs/demo.yaml, no outputs) into a temporary folder first. "In train" is
this process after a warm-up that compiles the hash grid's kernels (as the end of a training run has them);
"standalone" is each command in a fresh process, wall time including start-up. "Start-up" is a fresh process that
does what the command does before its work and nothing else: Python, the CLI and the command's module imported,
the checkpoint loaded (the median of three). Prints one row per command: both times, the start-up, the work
(standalone less start-up) and the ratios of the whole command and of its work to the in-train figure; the target
is standalone within 1.3x (README, "Looking at a run").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def train_demo(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "sdsbridge.cli", "train", str(ROOT / "configs" / "demo.yaml"),
                    f"log.runs_dir={folder}", "export.mesh=false", "export.video=false", "export.report=false",
                    "--no-progress"], check=True, capture_output=True)
    return folder / "bridge-a-red-torus"


COMMAND_MODULES = {"export": "sdsbridge.outputs.export.mesh", "video": "sdsbridge.outputs.export.video",
                   "eval": "sdsbridge.outputs.evaluation"}
"""The module each command imports for its work (the start-up floor imports it too)."""


def startup_seconds(run: Path, command: str) -> float:
    """Median wall time of three fresh processes that import the CLI and ``command``'s module and load ``run``'s
    checkpoint, then exit: the part of a standalone command that no kernel speed changes."""
    code = (f"import sdsbridge.cli.app, {COMMAND_MODULES[command]}, torch\n"
            "from sdsbridge.training.checkpoint import load_trained_scene\n"
            f"load_trained_scene({str(run)!r}, torch.device('cpu'))")
    return statistics.median(timed(lambda: subprocess.run([sys.executable, "-c", code], check=True,
                                                          capture_output=True)) for _ in range(3))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--mesh-resolution", type=int, default=128)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--video-resolution", type=int, default=256)
    parser.add_argument("--views", type=int, default=8)
    args = parser.parse_args()

    from sdsbridge.common.devices import fitted_cpu_threads
    from sdsbridge.outputs.evaluation import evaluate_scene
    from sdsbridge.outputs.export.mesh import export_mesh
    from sdsbridge.outputs.export.video import export_video
    from sdsbridge.training.checkpoint import load_trained_scene

    with tempfile.TemporaryDirectory(prefix="sdsbridge-bench-outputs-") as tmp:
        tmp = Path(tmp)
        run = args.run or train_demo(tmp / "runs")
        device = torch.device("cpu")
        scene, config, step = load_trained_scene(run, device)
        scene.prepare_long_run()  # a long training run compiles its kernels from the first step
        with fitted_cpu_threads(device), torch.no_grad():
            scene.density(torch.rand(1 << 18, 3) * 2 - 1)  # warm-up: the kernels compiled, as a trained run has them
            inside = {
                "export": timed(lambda: export_mesh(scene, config, run, step, resolution=args.mesh_resolution,
                                                   out=tmp / "in.glb")),
                "video": timed(lambda: export_video(scene, config, run, step, frames=args.frames,
                                                    resolution=args.video_resolution, progress=False,
                                                    out=tmp / "in.mp4")),
                "eval": timed(lambda: evaluate_scene(scene, config, step, device, n_views=args.views)),
            }
        cli = [sys.executable, "-m", "sdsbridge.cli"]
        commands = {
            "export": [*cli, "export", str(run), "--resolution", str(args.mesh_resolution), "--out", str(tmp / "out.glb")],
            "video": [*cli, "video", str(run), "--frames", str(args.frames), "--resolution", str(args.video_resolution),
                      "--out", str(tmp / "out.mp4"), "--no-progress"],
            "eval": [*cli, "eval", str(run), "--views", str(args.views)],
        }
        standalone = {name: timed(lambda c=command: subprocess.run(c, check=True, capture_output=True))
                      for name, command in commands.items()}
        startup = {name: startup_seconds(run, name) for name in commands}
    print(f"run: {run} (step {step}); mesh {args.mesh_resolution}^3, turntable {args.frames} frames at "
          f"{args.video_resolution} px, eval {args.views} views")
    print("| command | in train (s) | standalone (s) | ratio | start-up (s) | work (s) | work ratio |\n"
          "|---|---|---|---|---|---|---|")
    for name in commands:
        work = standalone[name] - startup[name]
        print(f"| {name} | {inside[name]:.2f} | {standalone[name]:.1f} | {standalone[name] / inside[name]:.2f} | "
              f"{startup[name]:.1f} | {work:.2f} | {work / inside[name]:.2f} |")


if __name__ == "__main__":
    main()

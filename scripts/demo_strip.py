"""The README picture: a strip of turntable frames of the CPU demo (rgb row above, the second panel below:
the demo's normals).

    python scripts/demo_strip.py [RUN_DIR] [--frames 6] [--out docs/demo.png]

Without RUN_DIR it first trains the demo as README says (`sdsbridge train configs/demo.yaml`, into a
temporary runs folder). It then reads the run's turntable video (what a user gets, not a re-render),
takes ``--frames`` frames evenly spaced around the orbit and writes one PNG: each frame's rgb panel in the
top row and its second panel (``export.video_modes[1]``) below it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from sdsbridge.outputs.naming import newest_output

ROOT = Path(__file__).resolve().parent.parent


def train_demo(runs_dir: Path) -> Path:
    """Run the README demo command into ``runs_dir``; returns the run directory."""
    subprocess.run([sys.executable, "-m", "sdsbridge", "train", str(ROOT / "configs" / "demo.yaml"),
                    f"log.runs_dir={runs_dir}", "--no-progress"], check=True)
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run_dir


def read_frames(video: Path) -> list[np.ndarray]:
    """All frames of an mp4 as [H, W, 3] uint8 arrays."""
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    width, height = meta["size"]
    return [np.frombuffer(data, np.uint8).reshape(height, width, 3) for data in reader]


def strip(frames: list[np.ndarray], count: int) -> np.ndarray:
    """``count`` frames evenly spaced over the orbit -> [2H, count*W, 3]: rgb panels above, the second panel
    below. Each turntable frame is [H, 2W', 3] (rgb | normal, W' = H, possibly one padding column)."""
    picks = [frames[round(i * len(frames) / count) % len(frames)] for i in range(count)]
    size = picks[0].shape[0]
    rgb = np.concatenate([f[:, :size] for f in picks], axis=1)
    second = np.concatenate([f[:, size:2 * size] for f in picks], axis=1)
    return np.concatenate([rgb, second], axis=0)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="A finished demo run (default: train one now).")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or train_demo(Path(tmp))
        video = newest_output(run_dir / "video", "turntable", "mp4")
        if video is None:
            parser.error(f"{run_dir / 'video'} holds no turntable (train with export.video=true)")
        image = strip(read_frames(video), args.frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(args.out, optimize=True)
    print(f"{args.out}: {image.shape[1]}x{image.shape[0]} from {video}")
    return args.out


if __name__ == "__main__":
    main()

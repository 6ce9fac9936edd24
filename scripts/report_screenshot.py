"""The README picture of the report page: trains the CPU demo (or takes a finished run), writes its report
(`sdsbridge report`) and takes a headless-Chromium screenshot of the page's top (3D view, turntable) as
docs/report.png.

    python scripts/report_screenshot.py [RUN_DIR] [--out docs/report.png] [--width 1000 --height 1100]
                                        [--texture] [--mode rgb,normal,shaded,depth]

--texture runs `sdsbridge export RUN --texture` and --mode `sdsbridge video RUN --mode ...` on the run first
(README's picture: both, as below).

Needs a chromium binary (Debian: apt-get install chromium). Without RUN_DIR the demo trains in a temporary
runs folder first (about a minute on 2 cores with OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def train_demo(runs_dir: Path) -> Path:
    """Run the README demo command into ``runs_dir``; returns the run directory."""
    subprocess.run([sys.executable, "-m", "sdsbridge", "train", str(ROOT / "configs" / "demo.yaml"),
                    f"log.runs_dir={runs_dir}", "--no-progress"], check=True)
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run_dir


def main(argv=None) -> Path:
    from sdsbridge.testing.browser import find_chromium, screenshot
    from sdsbridge.outputs.report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="A finished run (default: train the demo now).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=1100)
    parser.add_argument("--texture", action="store_true", help="Bake a textured mesh first (export --texture).")
    parser.add_argument("--mode", help="Render the turntable with these panels first (video --mode).")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        parser.error("no chromium binary on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or train_demo(Path(tmp))
        if args.texture:
            subprocess.run([sys.executable, "-m", "sdsbridge", "export", str(run_dir), "--texture", "--force"],
                           check=True)  # --force: a second screenshot of the same run bakes them again
        if args.mode:
            subprocess.run([sys.executable, "-m", "sdsbridge", "video", str(run_dir), "--mode", args.mode,
                            "--no-progress", "--force"], check=True)
        page = write_report([run_dir], Path(tmp) / "report.html")
        shot = screenshot(browser, page, Path(tmp) / "shot.png", args.width, args.height)
        image = Image.open(shot).convert("RGB")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height} from {run_dir}")
    return args.out


if __name__ == "__main__":
    main()

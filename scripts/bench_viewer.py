"""What the live viewer costs a run: the CPU demo trained without a viewer and with one whose page keeps asking for
frames, alternately, in this process; ms per step of each, the overhead, and whether the two runs' metrics and
final checkpoints are bit-identical.

    python scripts/bench_viewer.py                    # configs/demo.yaml, 1000 steps per run, 2 runs of each
    python scripts/bench_viewer.py --steps 400 --repeats 1 --mode normal
    python scripts/bench_viewer.py --browser          # the page is headless Chromium on this machine

The page (default): a stand-in for a browser inside this process, connected to a real viewer (viser on a free
port), whose camera moves every ``--move-seconds`` (so frames go from the small moving size up the resting sizes
and back); every frame is rendered, JPEG-encoded and handed over as to a browser (the websocket send is viser's,
on its own thread). ``--browser`` opens the viewer in headless Chromium instead and drags its camera: on a CPU-only
machine Chromium's software WebGL then competes with training for the cores, which is not the viewer's own cost.
ms/step is measured from metrics.jsonl between step ``--skip`` and the last (the prior's set-up and the hash
grid's one-off compile left out). Runs alternate (plain, viewer, plain, viewer, ...) so the machine's load
falls on both alike; the medians, and the fastest run of each, are compared. The viewer's own time between steps
(frames, panel) as a share of the training time is the figure that load does not blur.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import torch

ROOT = Path(__file__).resolve().parent.parent


class StandInPage:
    """A page as the viewer sees it: JPEG-encodes every background image it is sent, as viser does."""

    def __init__(self):
        self.client_id, self.frames, self.scene = 0, 0, self

    def set_background_image(self, image, format="jpeg", jpeg_quality=None):
        iio.imwrite("<bytes>", image, extension=".jpeg", quality=jpeg_quality or 75)
        self.frames += 1


def ms_per_step(run_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] >= skip)
    return 1000 * (rows[-1]["elapsed_s"] - first["elapsed_s"]) / (rows[-1]["step"] - first["step"])


def bit_identical(a: Path, b: Path) -> bool:
    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    ca, cb = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (a, b))
    same = all(torch.equal(x, y) for part in ("field", "background") for x, y in zip(ca[part].values(),
                                                                                     cb[part].values()))
    return rows(a) == rows(b) and same


def run_once(config, folder: Path, with_viewer: bool, args) -> tuple[Path, dict]:
    from sdsbridge.scene.cameras import look_at_origin
    from sdsbridge.testing.browser import LivePage, find_chromium
    from sdsbridge.training.loop import train
    from sdsbridge.view.cameras import ViewCamera
    from sdsbridge.view.viewer import LiveViewer, Page, ViewSettings

    folder.mkdir(parents=True)
    if not with_viewer:
        train(config, folder, torch.device("cpu"), show_progress=False)
        return folder, {}
    viewer = LiveViewer(ViewSettings(port=0), "bench", True, config.cameras)
    viewer.requests.mode = args.mode
    stop, page, browser = threading.Event(), StandInPage(), None

    def place(i: int) -> None:  # the stand-in page's camera, i steps around the object
        position = torch.tensor([[1.5 * math.cos(0.3 * i), 1.5 * math.sin(0.3 * i), 0.5]])
        with viewer.lock:
            viewer.pages[0].camera = ViewCamera(look_at_origin(position)[0].double().numpy(), math.radians(60), 16 / 9)
            viewer.pages[0].frame.camera_version += 1
            viewer.pages[0].frame.camera_time = time.monotonic()

    def move_camera():  # a step every move_seconds
        for i in range(1, 10 ** 9):
            if stop.wait(args.move_seconds):
                return
            if browser is not None:
                browser.drag((400, 350), (430, 350))
            else:
                place(i)

    if args.browser:
        browser = LivePage(find_chromium(), f"http://127.0.0.1:{viewer.port}/", 1000, 700)
    else:
        viewer.pages[0] = Page(page)
        place(0)
    mover = threading.Thread(target=move_camera, daemon=True)
    mover.start()
    try:
        train(config, folder, torch.device("cpu"), show_progress=False, watcher=viewer)
    finally:
        stop.set()
        mover.join()
        if browser is not None:
            browser.close()
        viewer.close()
    return folder, {"frames": viewer.frames_sent, "frame_s": viewer.frame_seconds, "hook_s": viewer.hook_seconds,
                    "train_s": viewer.train_seconds}


def main(argv=None) -> None:
    from sdsbridge.config.loader import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--skip", type=int, default=200, help="Steps left out of ms/step (set-up, compile).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="rgb", help="What the page shows: rgb | depth | opacity | normal.")
    parser.add_argument("--move-seconds", type=float, default=1.0)
    parser.add_argument("--browser", action="store_true", help="A headless Chromium page instead of the stand-in.")
    args = parser.parse_args(argv)
    config = load_config(args.config, [f"train.steps={args.steps}", "log.log_every=10"])
    plain, watched, stats = [], [], []
    with tempfile.TemporaryDirectory(prefix="sdsbridge-bench-viewer-") as tmp:
        for i in range(args.repeats):
            for with_viewer in (False, True):
                run, info = run_once(config, Path(tmp) / f"{'viewer' if with_viewer else 'plain'}-{i}", with_viewer,
                                     args)
                ms = ms_per_step(run, args.skip)
                (watched if with_viewer else plain).append((ms, run))
                if with_viewer:
                    stats.append(info)
                print(f"{'with viewer' if with_viewer else 'no viewer  '} run {i}: {ms:.2f} ms/step"
                      + (f", {info['frames']} frames, {1000 * info['frame_s'] / info['frames']:.1f} ms each, the "
                         f"viewer's time between steps {100 * info['hook_s'] / info['train_s']:.1f}% of the training "
                         f"time" if info.get("frames") else ""), flush=True)
        base, view = statistics.median(m for m, _ in plain), statistics.median(m for m, _ in watched)
        fastest = min(m for m, _ in plain), min(m for m, _ in watched)
        identical = all(bit_identical(plain[0][1], run) for _, run in plain[1:] + watched)
    frames = sum(s["frames"] for s in stats)
    share = sum(s["hook_s"] for s in stats) / sum(s["train_s"] for s in stats)
    print(f"{args.config.name}, {args.steps} steps, page: {'headless Chromium' if args.browser else 'stand-in'}, "
          f"mode {args.mode}, {torch.get_num_threads()} threads")
    print(f"ms/step (median of {args.repeats}): no viewer {base:.2f}, with viewer {view:.2f}: "
          f"overhead {100 * (view / base - 1):+.1f}%; the viewer's own time between steps {100 * share:.1f}% of "
          f"the training time ({frames / len(stats):.0f} frames per run)")
    print(f"fastest run of each (the least disturbed by other load): no viewer {fastest[0]:.2f}, with viewer "
          f"{fastest[1]:.2f}: overhead {100 * (fastest[1] / fastest[0] - 1):+.1f}%")
    print(f"metrics.jsonl and last.ckpt bit-identical across all runs: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()

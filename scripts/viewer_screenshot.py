"""The README picture of the live viewer: trains the CPU demo with `--view`, opens the page in headless Chromium,
pauses training at ``--at-step`` (so the frame grows to its full size), shows ``--mode`` and saves a screenshot as
docs/viewer.png (256 colours, to stay small), then stops the run with Ctrl-C.

    python scripts/viewer_screenshot.py [--at-step 900] [--out docs/viewer.png] [--width 1200 --height 760]

Needs a chromium binary (Debian: apt-get install chromium) and viser (pip install "sdsbridge[view]"). About two
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main(argv=None) -> Path:
    from sdsbridge.testing.browser import LivePage, find_chromium

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at-step", type=int, default=900)
    parser.add_argument("--mode", default="rgb", help="rgb | depth | opacity | normal")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "viewer.png")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        parser.error("no chromium binary on PATH (Debian: apt-get install chromium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sdsbridge-viewer-shot-") as runs:
        run = subprocess.Popen([sys.executable, "-m", "sdsbridge", "train", str(ROOT / "configs" / "demo.yaml"),
                                f"log.runs_dir={runs}", "export.mesh=false", "export.video=false", "--no-progress",
                                "--view", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ)
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(run.stderr), daemon=True).start()
        try:
            wait_for(lambda: any("viewer: http" in line for line in log), 300, "the viewer")
            with LivePage(browser, f"http://127.0.0.1:{port}/", args.width, args.height) as page:
                def step() -> int:
                    match = re.search(r"step (\d+) of", page.text())
                    return int(match.group(1)) if match else -1

                wait_for(lambda: step() >= args.at_step, 900, f"step {args.at_step}")
                page.click("pause training")
                if args.mode != "rgb":
                    page.click_at(*page.evaluate("""(() => { const r = [...document.querySelectorAll('input')].find(
                        (e) => e.value === 'rgb').getBoundingClientRect(); return [r.x + r.width / 2,
                        r.y + r.height / 2]; })()"""))
                    page.click(args.mode)
                page.evaluate("document.querySelectorAll('.mantine-Notification-root').forEach((e) => e.remove())")
                time.sleep(8)  # the frame doubles up to 512 px while the camera rests
                args.out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(page.screenshot()).quantize(256).save(args.out, optimize=True)
        finally:
            run.send_signal(signal.SIGINT)
            run.communicate(timeout=120)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return args.out


if __name__ == "__main__":
    main()

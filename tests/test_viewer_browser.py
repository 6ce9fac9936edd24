"""The live viewer as a user sees it: `sdsbridge train --view PORT` on a tiny run, the page opened in headless
Chromium (Debian's package; CI installs it). A rendered frame arrives and is not blank, the step counter advances,
pause holds it, the frame changes when the camera is orbited, panned and zoomed and when depth is chosen, resume goes on,
and Ctrl-C stops the run with its checkpoint. Skipped where no chromium binary is found."""

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cli_helpers import TINY, child_env, prompt_file

pytest.importorskip("viser", reason="the viewer needs viser (pip install 'sdsbridge[view]'; in the test extras)")

from sdsbridge.testing.browser import LivePage  # noqa: E402

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1000, 700
VIEW = (slice(160, 640), slice(80, 640))
"""Rows, columns of the screenshot that only the 3D view covers (not the panel at the right, the notice at the top
left, nor the orientation gizmo at the bottom left)."""
EMPTY = np.array([255, 255, 255])
"""viser's empty canvas (no frame yet)."""


def press_until(page, button: str, status: str) -> bool:
    """True once ``status`` is in the page's text, else click ``button`` (again) and return False. The panel's
    status lines change length every step, so the buttons below them can move between finding one and clicking
    it: a click can miss, and is repeated. A button already gone (its label flipped) is not clicked."""
    if status in page.text():
        return True
    try:
        page.click(button)
    except RuntimeError:
        pass
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout_s: float, what: str, interval: float = 0.5):
    """``condition()``'s first value that is not None, False or 0, polled; fails naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value is not None and value is not False and (not isinstance(value, int) or value):
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def step_shown(page: LivePage) -> int:
    match = re.search(r"step (\d+) of", page.text())
    return int(match.group(1)) if match else -1


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels whose colour differs by more than 20 levels (of 255) in some channel."""
    return float((np.abs(a - b).max(-1) > 20).mean())


def settled_view(page: LivePage, timeout_s: float = 60) -> np.ndarray:
    """The 3D view once two screenshots a second apart agree (the frames stopped growing)."""
    previous = page.screenshot()[VIEW].astype(int)

    def same_as_before():
        nonlocal previous
        time.sleep(1.0)
        current = page.screenshot()[VIEW].astype(int)
        same, previous = np.abs(current - previous).mean() < 0.5, current
        return same

    until(same_as_before, timeout_s, "the frame to settle", interval=0)
    return previous


def test_a_run_is_watched_paused_moved_and_resumed_in_the_browser(browser, tmp_path):
    port = free_port()
    args = [sys.executable, "-m", "sdsbridge", "train", str(prompt_file(tmp_path)), f"log.runs_dir={tmp_path / 'runs'}",
            "train.steps=100000", "log.val_every=50", *TINY, "--view", str(port)]
    env = {**child_env(), "SDSBRIDGE_COMPILE": "0"}  # eager hash-grid kernels: no compile in a test
    run = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(run.stderr), daemon=True).start()
    try:
        until(lambda: any(f"viewer: http://localhost:{port}" in line for line in log), 120, "the viewer's address")
        with LivePage(browser, f"http://127.0.0.1:{port}/", WIDTH, HEIGHT) as page:
            until(lambda: step_shown(page) >= 1, 120, "the step counter")
            page.click("training cameras")  # untick: only the rendered frame is left in the view

            def a_frame():
                view = page.screenshot()[VIEW].astype(int)
                drawn = (np.abs(view - EMPTY).sum(-1) > 30).mean()
                return view if drawn > 0.95 and view.std() > 1.0 else None

            until(a_frame, 60, "a rendered frame that is not blank")
            first = step_shown(page)
            until(lambda: step_shown(page) > first, 60, "the step counter to advance")

            until(lambda: press_until(page, "pause training", "paused · step"), 30, "'paused' in the status",
                  interval=3)
            held = step_shown(page)
            before = settled_view(page)

            page.click_at(*page.evaluate("""(() => { const r = [...document.querySelectorAll('input')].find(
                (e) => e.value === 'rgb').getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];
                })()"""))  # open the 'show' list
            page.click("depth")
            depth = settled_view(page)
            assert changed(before, depth) > 0.05, "choosing depth did not change the frame"

            page.drag((330, 400), (470, 360))  # orbit
            page.drag((330, 400), (450, 330), button="right")  # pan: the object moves across the view
            page.wheel(360, 400, -300)  # zoom
            moved = settled_view(page)
            assert changed(depth, moved) > 0.05, "the frame did not change when the camera moved"
            assert (np.abs(moved - EMPTY).sum(-1) > 30).mean() > 0.95
            assert step_shown(page) == held  # paused: no step while the frames settled

            until(lambda: press_until(page, "resume training", "training · step"), 30, "'training' in the status",
                  interval=3)
            until(lambda: step_shown(page) > held + 5, 60, "training to go on after resume")
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 130, "".join(log)[-3000:]
    assert "viewer closed" in out and not any("Traceback" in line for line in log)
    assert any(line.startswith("viewer: training paused at step") for line in log)

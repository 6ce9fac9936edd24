"""Headless Chromium for looking at report pages: the page's DOM after its scripts ran, and a screenshot.

Used by the browser tests and the screenshot scripts (report_screenshot.py, viewer_screenshot.py); not by any
command. ``LivePage`` drives a live page (the viewer) over the DevTools protocol. WebGL runs on SwiftShader (the
CPU), so the 3D view draws on machines without a GPU. Each call gets its own fresh profile folder.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
         "--enable-unsafe-swiftshader", "--hide-scrollbars", "--mute-audio", "--no-first-run",
         "--disable-extensions", "--disable-background-networking")


def find_chromium() -> Optional[str]:
    """The first Chromium / Chrome binary on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, page: Path, extra: list[str], width: int, height: int, budget_ms: int,
         timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sdsbridge-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                               f"--virtual-time-budget={budget_ms}", *extra, Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout_s)


def dump_dom(browser: str, page: Path, width: int = 1000, height: int = 1400, budget_ms: int = 15000,
             timeout_s: float = 180) -> str:
    """The page's DOM (HTML text) after ``budget_ms`` of virtual time."""
    return _run(browser, page, ["--dump-dom"], width, height, budget_ms, timeout_s).stdout


def screenshot(browser: str, page: Path, out: Path, width: int = 1000, height: int = 1400, budget_ms: int = 15000,
               timeout_s: float = 180) -> Path:
    """A ``width`` x ``height`` PNG of the page's top after ``budget_ms`` of virtual time, at ``out``."""
    out = Path(out).resolve()
    result = _run(browser, page, [f"--screenshot={out}"], width, height, budget_ms, timeout_s)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {result.stderr[-500:]}")
    return out


class LivePage:
    """A page of a live site (the viewer) in headless Chromium, driven over the DevTools protocol: evaluate
    JavaScript, take screenshots, drag the mouse. Chromium runs with its own fresh profile until ``close``.
    Needs the ``websockets`` package (a dependency of viser, the viewer's)."""

    def __init__(self, browser: str, url: str, width: int = 1000, height: int = 700, timeout_s: float = 30):
        import json
        import time
        import urllib.request

        from websockets.sync.client import connect

        self._json = json
        self._profile = tempfile.TemporaryDirectory(prefix="sdsbridge-chromium-")
        self._process = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=timeout_s))
        page = next(t for t in targets if t["type"] == "page")
        self._socket = connect(page["webSocketDebuggerUrl"], max_size=64 * 2 ** 20, open_timeout=timeout_s)
        self._id = 0
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        self._socket.send(self._json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = self._json.loads(self._socket.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        """The page's visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self):
        """The viewport as an [H, W, 3] uint8 array."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def drag(self, start: tuple[int, int], end: tuple[int, int], steps: int = 8, button: str = "left") -> None:
        """Press ``button`` ('left' | 'right') at ``start`` (x, y in CSS pixels), move to ``end`` in ``steps``
        moves, release."""
        import time

        held = {"left": 1, "right": 2}[button]

        def mouse(kind: str, x: float, y: float, buttons: int) -> None:
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button=button, buttons=buttons, clickCount=1)

        mouse("mousePressed", *start, held)
        for i in range(1, steps + 1):
            mouse("mouseMoved", start[0] + (end[0] - start[0]) * i / steps, start[1] + (end[1] - start[1]) * i / steps,
                  held)
            time.sleep(0.03)
        mouse("mouseReleased", *end, 0)

    def click(self, text: str) -> None:
        """Click (press and release the left button at its centre) the visible button whose text is ``text``, or
        the input a ``<label>`` with that text is for (a checkbox), or a list option with that text."""
        centre = self.evaluate(f"""(() => {{
            const text = {self._json.dumps(text)};
            const shown = (e) => e && e.getBoundingClientRect().width > 0;
            let e = [...document.querySelectorAll('button, [role=option]')].find(
                (b) => b.innerText.trim() === text && shown(b));
            if (!e) {{
                const label = [...document.querySelectorAll('label')].find((l) => l.textContent.trim() === text);
                e = label && document.getElementById(label.htmlFor);
            }}
            if (!shown(e)) return null;
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        if centre is None:
            raise RuntimeError(f"no visible button, labelled input or option '{text}' on the page")
        self.click_at(*centre)

    def click_at(self, x: float, y: float) -> None:
        """A left click at (x, y) in CSS pixels."""
        for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)

    def wheel(self, x: float, y: float, delta_y: float) -> None:
        """Turn the mouse wheel over (x, y) by ``delta_y`` pixels (negative: towards the page, zoom in)."""
        self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=delta_y)

    def close(self) -> None:
        if getattr(self, "_socket", None) is not None:
            self._socket.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._profile.cleanup()

    def __enter__(self) -> "LivePage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

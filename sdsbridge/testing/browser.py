"""Headless Chromium for looking at report pages: the page's DOM after its scripts ran, and a screenshot.

Used by the browser test and scripts/report_screenshot.py; not by any command. WebGL runs on SwiftShader (the
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

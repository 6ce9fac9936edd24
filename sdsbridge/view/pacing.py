"""When the viewer may render and how large: a time budget that is a share of training time, and a frame size that
starts small while the camera moves and doubles while it rests (nerfview's "low while moving, high when static",
without its pauses of training).

The budget is a token bucket: each training step earns ``share`` x its wall time, each frame spends its own (render,
encode and send); a frame starts only while the balance is positive (a moved camera's: above ``-max_debt``), so over
any stretch of training the viewer takes at most ``share`` of the time plus ``max_credit + max_debt`` and one frame.
Paused training, and ``sdsbridge view``, have no budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class PacingSettings:
    """How the viewer paces its frames. Times in seconds, sizes in pixels (a frame's longer side)."""

    share: float = 0.08
    """Most of the training time the viewer may take between steps (frames, panel). 0.08 leaves room under the
    promised 10% for what happens outside the loop's thread (viser sending, the CPU caches a frame evicts)."""
    max_credit: float = 0.25
    """The balance never grows beyond this (a viewer idle for long does not then render for long)."""
    max_debt: float = 0.25
    """A moved camera's frame may start while the balance is above minus this (a large resting frame just sent
    does not leave a moving camera without frames for long); the debt is repaid before any resting frame."""
    move_seconds: float = 0.04
    """Target time of a frame while the camera moves: sets its size from the measured pixels per second."""
    rest_seconds: float = 0.25
    """The camera rests once no camera message came for this long; then the frame size doubles per frame."""
    max_frame_seconds: float = 0.25
    """While training, a resting frame grows only while its predicted time stays under this."""
    refresh_seconds: float = 1.0
    """While training changes the scene, a resting camera's frame is redrawn at most this often."""
    min_side: int = 32
    max_side: int = 512


class Budget:
    """The token bucket of the module docstring (a moved camera may borrow up to ``max_debt``)."""

    def __init__(self, share: float, max_credit: float, max_debt: float = 0.0):
        self.share, self.max_credit, self.max_debt = share, max_credit, max_debt
        self.credit = 0.0

    def earn(self, train_seconds: float) -> None:
        self.credit = min(self.credit + self.share * max(train_seconds, 0.0), self.max_credit)

    def spend(self, seconds: float) -> None:
        self.credit -= seconds

    def allows(self, moved: bool = False) -> bool:
        """Whether a frame may start: while the balance is positive, or above -max_debt for a moved camera."""
        return self.credit > (-self.max_debt if moved else 0.0)


class PixelRate:
    """Measured frame cost per pixel, per viewer mode (normals cost more than rgb): an exponential average of
    pixels per second; unknown until the first frame of a mode."""

    def __init__(self):
        self.rates: dict[str, float] = {}

    def update(self, mode: str, pixels: int, seconds: float) -> None:
        rate = pixels / max(seconds, 1e-4)
        old = self.rates.get(mode)
        self.rates[mode] = rate if old is None else 0.7 * old + 0.3 * rate

    def side_for(self, mode: str, seconds: float, aspect: float) -> Optional[int]:
        """The longer side of a frame of width / height ``aspect`` that takes about ``seconds``; None if unknown."""
        rate = self.rates.get(mode)
        if rate is None:
            return None
        pixels = rate * seconds
        short = math.sqrt(pixels / max(aspect, 1.0 / aspect))
        return int(short * max(aspect, 1.0 / aspect))


@dataclass
class FrameState:
    """What one browser was last sent, to decide its next frame (``next_side``)."""

    camera_version: int = 0
    """Bumped by every camera message (and by a newly shown scene)."""
    camera_time: float = 0.0
    """When the last camera message came (time.monotonic)."""
    frame_version: int = -1
    """``camera_version`` of the last frame sent (-1: none yet)."""
    frame_side: int = 0
    frame_step: int = -1
    """The training step the last frame showed."""
    frame_time: float = 0.0
    mode: str = ""
    """The viewer mode of the last frame (a change of mode redraws like a moved camera)."""


def next_side(state: FrameState, step: int, now: float, settings: PacingSettings, rate: PixelRate, mode: str,
              aspect: float, training: bool) -> Optional[int]:
    """The longer side of the frame this browser needs next, or None if it needs none now:
    a moved camera gets a small frame (``move_seconds`` worth), a resting one twice the last size up to
    ``max_side`` (while ``training``, only while a frame is predicted under ``max_frame_seconds``), and a resting
    camera at its final size is redrawn at most every ``refresh_seconds`` once training changed the scene."""
    low = rate.side_for(mode, settings.move_seconds, aspect) or settings.min_side
    low = max(settings.min_side, min(low, settings.max_side))
    if state.camera_version != state.frame_version or state.mode != mode:
        return low
    if now - state.camera_time < settings.rest_seconds:
        return None
    top = settings.max_side
    if training:
        affordable = rate.side_for(mode, settings.max_frame_seconds, aspect)
        top = max(low, min(top, affordable if affordable is not None else low))
    if state.frame_side < top:
        return min(2 * state.frame_side, top)
    if state.frame_step != step and now - state.frame_time >= settings.refresh_seconds:
        return min(state.frame_side, top)
    return None

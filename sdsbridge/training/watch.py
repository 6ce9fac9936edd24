"""What the training loop tells an observer between steps, and what the observer may ask of it: the hook a live
viewer (``view/viewer.py``) plugs into. The loop imports nothing of the viewer; without one it calls nothing.

An observer must not change a run's results: it may render the scene only inside ``Scene.preview()`` (eval mode,
the RNG forked, no training bookkeeping advanced) and may write only through ``LoopControls.save_checkpoint``,
the loop's own atomic checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from sdsbridge.config.schema import Config
from sdsbridge.scene.base import Scene
from sdsbridge.scene.cameras import Cameras


@dataclass
class StepReport:
    """One finished training step, as the loop knows it without waiting for the device."""

    step: int
    """Steps done (1 after the first step)."""
    steps: int
    """The run's ``train.steps``."""
    stage: int
    """The method's stage at this step (1, or 2 in the bridge's stage two)."""
    cameras: Cameras
    """The step's training cameras (on the scene's device)."""
    train_seconds: float
    """Wall time the loop spent since the observer last returned: the step and its logging / validation /
    checkpoint work. The observer's time budget is a share of this."""
    metrics: Optional[dict] = None
    """The metrics.jsonl row, on logging steps (``log.log_every``); else None."""
    validation: Optional[Path] = None
    """The validation grid PNG written after this step, if one was."""


@dataclass
class LoopControls:
    """What an observer may do to the loop, from the loop's own thread."""

    stop_requested: Callable[[], bool]
    """True once Ctrl-C / SIGTERM asked the loop to stop (a paused observer must return then)."""
    save_checkpoint: Callable[[], Optional[Path]]
    """Write a checkpoint of the current step now (atomic, as at ``log.checkpoint_every``); its path, or None
    when the write failed (logged)."""


class StepWatcher(Protocol):
    """Something the loop calls between steps (the live viewer)."""

    def attach(self, scene: Scene, config: Config, run_dir: Path, step: int) -> None:
        """Before the first step of this call: the scene being trained, the run's config and directory, and the
        step training starts from."""

    def between_steps(self, report: StepReport, controls: LoopControls) -> None:
        """After each step, on the loop's thread. Returns when training may go on: at once, or (paused) when
        resumed or when ``controls.stop_requested()``. Must not raise for a browser or network problem."""

    def finish(self, step: int, interrupted: bool) -> None:
        """After the last step of this call (also when stopped by a signal)."""

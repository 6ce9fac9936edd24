"""``sdsbridge view RUN``: the viewer on a run's newest checkpoint that loads and verifies, reloaded when the run
(still training elsewhere) writes a newer one, with its newest validation grid. Serves until Ctrl-C."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from sdsbridge.common.errors import UserError
from sdsbridge.training.checkpoint import find_checkpoint, load_trained_scene, run_dir_of
from sdsbridge.view.viewer import LiveViewer, ViewSettings

log = logging.getLogger("sdsbridge")

POLL_SECONDS = 2.0
"""How often a run directory is checked for a newer checkpoint."""


def checkpoint_signature(run: Path) -> Optional[tuple[str, int]]:
    """(path, modification time in ns) of the checkpoint ``find_checkpoint`` would load first; None when there is
    none (yet, or any more)."""
    try:
        path = find_checkpoint(run)
        return str(path), path.stat().st_mtime_ns
    except (OSError, UserError):  # none yet, or a file renamed under us: look again at the next poll
        return None


def newest_validation(run: Path) -> Optional[Path]:
    """The run's newest validation grid PNG, if any."""
    grids = sorted((run / "validation").glob("step-*.png")) if (run / "validation").is_dir() else []
    return grids[-1] if grids else None


def view_run(run: Path, settings: ViewSettings, device: torch.device) -> None:
    """Serve ``run`` (a run directory or a .ckpt file) until interrupted (``Interrupted`` from the signal handler
    propagates; the caller closes nothing: this function stops the server on the way out)."""
    run = Path(run)
    scene, config, step = load_trained_scene(run, device)  # UserError for a run without a usable checkpoint
    follow = run.is_dir()
    viewer = LiveViewer(settings, title=f"sdsbridge: {run_dir_of(find_checkpoint(run)).name}", training=False,
                        cameras=config.cameras)
    try:
        signature = checkpoint_signature(run) if follow else None
        viewer.show_scene(scene, config, step, _note(run, step, follow))
        _show_grid(viewer, run_dir_of(find_checkpoint(run)))
        while True:
            deadline = time.monotonic() + POLL_SECONDS
            viewer.serve(lambda: time.monotonic() >= deadline)
            if not follow:
                continue
            current = checkpoint_signature(run)
            if current is None or current == signature:
                continue
            signature = current
            try:
                scene, config, step = load_trained_scene(run, device)
            except UserError as exc:  # e.g. deleted between the poll and the load: keep showing the last one
                log.warning(f"viewer: {exc}; still showing step {step}")
                continue
            log.info(f"viewer: showing the newer checkpoint at step {step}")
            viewer.show_scene(scene, config, step, _note(run, step, follow))
            _show_grid(viewer, run)
    finally:
        viewer.close()


def _note(run: Path, step: int, follow: bool) -> str:
    return (f"checkpoint of {run.name} at step {step}" +
            (" (a newer one is shown when the run writes it)" if follow else ""))


def _show_grid(viewer: LiveViewer, run: Path) -> None:
    grid = newest_validation(run)
    if grid is not None:
        viewer.show_validation(grid)

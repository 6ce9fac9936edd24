"""The viewer's GUI panel (viser's ``server.gui``, shared by every open page): the run's status (stage, step, t,
losses), what to show (rgb | depth | opacity | normal), pause / resume and save-checkpoint-now buttons, the last
validation grid, and the training cameras of the last steps as wireframe frusta in the 3D scene.

Button and dropdown callbacks run on viser's threads: they only set flags (``Requests``) that the training thread
reads between steps; everything that touches torch or sends images runs on the training thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import numpy as np
import viser

from sdsbridge.scene.cameras import Cameras
from sdsbridge.view.cameras import frustum_segments
from sdsbridge.view.frames import MODES

LABEL_COLOURS = {"front": (220, 60, 50), "side": (60, 160, 60), "back": (50, 90, 220), "overhead": (120, 120, 120)}
"""Frustum colour of a training camera by its view label (RGB 0-255)."""


@dataclass
class Requests:
    """What the page asked for, set on viser's threads and read on the training thread."""

    paused: bool = False
    save_now: bool = False
    mode: str = "rgb"
    show_cameras: bool = True
    changed: threading.Event = field(default_factory=threading.Event)
    """Set on every request (and camera move): wakes a paused or idle viewer."""


def status_text(state: str, step: int, steps: Optional[int], stage: Optional[int], metrics: Optional[dict],
                note: str = "", cost: Optional[float] = None) -> str:
    """The status markdown: '**training** · step 120 of 1500 · stage 1', then t and the loss terms of the last
    logged step, then ``note`` (e.g. the checkpoint just saved) and ``cost``, the viewer's share of the training
    time so far."""
    head = f"**{state}** · step {step}" + (f" of {steps}" if steps else "") + (f" · stage {stage}" if stage else "")
    lines = [head]
    if metrics:
        terms = ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("loss_"))
        lines.append(f"t {metrics['t']:.0f} · loss {metrics['loss']:.4g}" + (f" ({terms})" if terms else "")
                     + f" · logged at step {metrics['step']}")
    if note:
        lines.append(note)
    if cost is not None:
        lines.append(f"this viewer: {100 * cost:.1f}% of the training time")
    return "  \n".join(lines)


class Panel:
    """The GUI of one viewer. ``training``: with the pause / resume and save buttons (``train --view``); without
    them for ``sdsbridge view``."""

    def __init__(self, server: viser.ViserServer, training: bool, title: str):
        self.server, self.requests = server, Requests()
        gui = server.gui
        gui.set_panel_label(title)
        self.status = gui.add_markdown("**starting**")
        self.mode = gui.add_dropdown("show", MODES, initial_value="rgb")
        self.mode.on_update(lambda _: self._request(mode=self.mode.value))
        self.cameras_box = gui.add_checkbox("training cameras", True, visible=training)
        self.cameras_box.on_update(lambda _: self._request(show_cameras=self.cameras_box.value))
        self.pause = gui.add_button("pause training", visible=training)
        self.resume = gui.add_button("resume training", visible=False)
        self.save = gui.add_button("save checkpoint now", visible=training)
        self.pause.on_click(lambda _: self.set_paused(True))
        self.resume.on_click(lambda _: self.set_paused(False))
        self.save.on_click(lambda _: self._request(save_now=True))
        self.validation: Optional[viser.GuiImageHandle] = None
        self.frusta: Optional[viser.LineSegmentsHandle] = None

    def _request(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self.requests, name, value)
        self.requests.changed.set()

    def set_paused(self, paused: bool) -> None:
        """What the pause / resume buttons do."""
        self.pause.visible, self.resume.visible = not paused, paused
        self._request(paused=paused)

    def finished(self) -> None:
        """No more training: hide the training controls."""
        for handle in (self.pause, self.resume, self.save):
            handle.visible = False

    def show_status(self, text: str) -> None:
        self.status.content = text

    def show_validation(self, path: Path) -> None:
        """The validation grid PNG at ``path`` under the status (replacing the previous one)."""
        image = np.asarray(iio.imread(path))[..., :3]
        if self.validation is None:
            self.validation = self.server.gui.add_image(image, label=f"validation: {path.name}", format="png")
        else:
            self.validation.image = image
            self.validation.label = f"validation: {path.name}"

    def show_cameras(self, cameras: list[Cameras], radius: float) -> None:
        """Wireframe frusta of ``cameras`` (on any device), coloured by view label, as one line-segment node (one
        message per update), or none when unticked."""
        batches = cameras if self.requests.show_cameras else []
        labels = [label for batch in batches for label in batch.labels]
        if not labels:
            if self.frusta is not None:
                self.frusta.visible = False
            return
        c2w = np.concatenate([batch.c2w.detach().cpu().double().numpy() for batch in batches])
        fovy = np.concatenate([batch.fovy.detach().cpu().double().numpy() for batch in batches])
        points = frustum_segments(c2w, fovy, 0.15 * radius).astype(np.float32)
        colours = np.repeat(np.array([LABEL_COLOURS.get(label, (20, 20, 20)) for label in labels], np.uint8), 16,
                            axis=0).reshape(-1, 2, 3)
        if self.frusta is None:
            self.frusta = self.server.scene.add_line_segments("/training_cameras", points, colours, thickness=1.5,
                                                              thickness_units="screen")
            return
        with self.server.atomic():
            self.frusta.points, self.frusta.colors, self.frusta.visible = points, colours, True

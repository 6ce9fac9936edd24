"""The live viewer: a viser server on localhost whose pages show the scene rendered from their own camera, and the
training hook (``training.watch.StepWatcher``) that feeds it.

Threads: viser serves pages and runs callbacks on its own threads; those only record the camera of each page and
the panel's requests. Every render, image send and GUI update happens on the training thread, between steps,
within ``PacingSettings.share`` of the training time (pacing.py), through ``Scene.preview()`` (frames.py), so a
run trains bit-identically with and without a viewer. A browser that goes away, or an image that cannot be sent,
is a log line; training never waits for a page. Paused training, and ``sdsbridge view``, render without a budget.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import viser

from sdsbridge.common.errors import UserError
from sdsbridge.config.schema import Config
from sdsbridge.scene.base import Scene
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.training.watch import LoopControls, StepReport
from sdsbridge.view import DEFAULT_PORT
from sdsbridge.view.cameras import ViewCamera, from_viser, initial_pose
from sdsbridge.view.frames import frame_size, render_frame
from sdsbridge.view.pacing import Budget, FrameState, PacingSettings, PixelRate, next_side
from sdsbridge.view.panel import Panel, status_text

log = logging.getLogger("sdsbridge")

LOCAL_HOST = "127.0.0.1"


@dataclass
class ViewSettings:
    """Where the viewer listens and how it paces itself (not part of a run's config: a viewer changes nothing)."""

    host: str = LOCAL_HOST
    """Address to listen on; 127.0.0.1 is this machine only (README: what another address means)."""
    port: int = DEFAULT_PORT
    """Port; when it is taken viser takes the next free one, and the log says which. 0: any free port."""
    pacing: PacingSettings = field(default_factory=PacingSettings)
    cameras_shown: int = 8
    """Training cameras of the last steps drawn as frusta."""
    panel_seconds: float = 0.5
    """The status and the frusta are refreshed at most this often while training."""


def check_host(host: str) -> None:
    """UserError naming --view-host when this machine cannot listen on ``host`` (checked before a run starts:
    viser would otherwise try port after port)."""
    try:
        with socket.create_server((host, 0)):
            pass
    except (OSError, OverflowError, ValueError) as exc:
        raise UserError(f"--view-host: cannot listen on '{host}' ({exc.strerror or exc})") from None


def start_server(host: str, port: int) -> viser.ViserServer:
    """A viser server on ``host``: ``port``, or the next free one (said in the log line that gives the address)."""
    with contextlib.redirect_stdout(io.StringIO()):  # viser prints its own banner even when not verbose
        server = viser.ViserServer(host=host, port=port, verbose=False)
    actual = server.get_port()
    if port and actual != port:
        log.warning(f"viewer: port {port} is in use; serving on port {actual} instead")
    log.info(f"viewer: http://{'localhost' if host == LOCAL_HOST else host}:{actual}"
             + ("" if host == LOCAL_HOST else " (reachable from other machines: README, 'Live viewer')"))
    return server


@dataclass
class Page:
    """One open browser page: its camera and what it was last sent."""

    client: viser.ClientHandle
    camera: Optional[ViewCamera] = None
    frame: FrameState = field(default_factory=FrameState)
    broken: bool = False
    """An image could not be sent (logged once); it is skipped until it sends a new camera."""


class LiveViewer:
    """The viewer of a training run (``attach``/``between_steps``/``finish``: training.watch.StepWatcher) or of a
    checkpoint (``show_scene`` then ``serve``). ``close`` stops the server."""

    def __init__(self, settings: ViewSettings, title: str, training: bool, cameras: CameraConfig):
        self.settings = settings
        self.server = start_server(settings.host, settings.port)
        self.port = self.server.get_port()
        position, fov = initial_pose(cameras)  # a new page starts at the first validation view
        initial = self.server.initial_camera
        initial.position, initial.look_at, initial.up, initial.fov = position, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), fov
        self.panel = Panel(self.server, training, title)
        self.requests = self.panel.requests
        self.budget = Budget(settings.pacing.share, settings.pacing.max_credit, settings.pacing.max_debt)
        self.rate = PixelRate()
        self.pages: dict[int, Page] = {}
        self.lock = threading.Lock()
        self.scene: Optional[Scene] = None
        self.config: Optional[Config] = None
        self.step, self.steps, self.stage, self.metrics, self.note = 0, None, None, None, ""
        self.state = "starting"
        self.recent_cameras: collections.deque = collections.deque(maxlen=settings.cameras_shown)
        self.panel_time = 0.0
        self.failing: set[str] = set()
        """What could not be sent the last time (logged once)."""
        self.frames_sent, self.frame_seconds, self.save_seconds = 0, 0.0, 0.0
        self.train_seconds, self.hook_seconds = 0.0, 0.0
        """Training time reported, and the viewer's own time between steps (frames, panel; not pauses, nor the
        checkpoints asked for): their ratio is the viewer's cost, shown in the status."""
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    # ---- viser's threads: record, never render -------------------------------------------------------------
    def _connect(self, client: viser.ClientHandle) -> None:
        with self.lock:
            self.pages[client.client_id] = page = Page(client)
            count = len(self.pages)
        log.info(f"viewer: a page connected ({count} open)")

        def moved(camera: viser.CameraHandle) -> None:
            view = from_viser(camera.wxyz, camera.position, camera.fov, camera.aspect)
            with self.lock:
                page.camera, page.broken = view, False
                page.frame.camera_version += 1
                page.frame.camera_time = time.monotonic()
            self.requests.changed.set()

        client.camera.on_update(moved)
        moved(client.camera)  # viser announces a page once its first camera message came

    def _disconnect(self, client: viser.ClientHandle) -> None:
        with self.lock:
            self.pages.pop(client.client_id, None)
            count = len(self.pages)
        log.info(f"viewer: a page closed ({count} open)")
        if count == 0 and self.requests.paused:  # no page left to resume it: a closed tab never stops a run
            log.info("viewer: the last page closed while training was paused; training resumes")
            self.panel.set_paused(False)

    # ---- the training thread -------------------------------------------------------------------------------
    def attach(self, scene: Scene, config: Config, run_dir: Path, step: int) -> None:
        """The scene to render from now on (training.watch.StepWatcher)."""
        self.scene, self.config, self.step, self.steps = scene, config, step, config.train.steps
        self.state = "training"
        self._show_status()

    def between_steps(self, report: StepReport, controls: LoopControls) -> None:
        """Earn budget, update the panel, honour save / pause, and send the frames the budget allows."""
        started, frames_before, saves_before = time.perf_counter(), self.frame_seconds, self.save_seconds
        self.budget.earn(report.train_seconds)
        self.step, self.stage = report.step, report.stage
        self.metrics = report.metrics or self.metrics
        self.recent_cameras.append(report.cameras)
        if report.validation is not None:
            self.show_validation(report.validation)
        if started - self.panel_time >= self.settings.panel_seconds or report.validation:
            self.panel_time = started
            self._show_status()
            self._guard("training cameras", lambda: self.panel.show_cameras(list(self.recent_cameras),
                                                                             self.scene.radius))
        self._save_if_asked(controls)
        if self.requests.paused and not controls.stop_requested():
            self._pause(controls)
            self.budget.credit = 0.0
            return
        while self._send_next_frame(training=True):
            pass
        # a checkpoint asked for is not the viewer's time; frames spent theirs already, the rest (panel) is spent here
        own = time.perf_counter() - started - (self.save_seconds - saves_before)
        self.budget.spend(own - (self.frame_seconds - frames_before))
        self.train_seconds, self.hook_seconds = self.train_seconds + report.train_seconds, self.hook_seconds + own

    def finish(self, step: int, interrupted: bool) -> None:
        self.state = "stopped" if interrupted else "finished"
        self.step = step
        self._guard("panel", self.panel.finished)
        self._show_status()

    def _pause(self, controls: LoopControls) -> None:
        log.info(f"viewer: training paused at step {self.step}")
        self.state = "paused"
        self._show_status()
        self.serve(lambda: not self.requests.paused or controls.stop_requested(), controls)
        self.state = "training"
        self._show_status()
        log.info(f"viewer: training resumed at step {self.step}" if self.requests.paused is False else
                 f"viewer: stopping while paused at step {self.step}")

    def _save_if_asked(self, controls: LoopControls) -> None:
        if not self.requests.save_now:
            return
        self.requests.save_now = False
        started = time.perf_counter()
        path = controls.save_checkpoint()
        self.save_seconds += time.perf_counter() - started
        self.note = f"saved {path.name} at step {self.step}" if path else f"checkpoint at step {self.step} not written"
        log.info(f"viewer: {self.note}" + (f" ({path})" if path else ""))
        self._show_status()

    def show_scene(self, scene: Scene, config: Config, step: int, note: str) -> None:
        """Show ``scene`` (a checkpoint's, for ``sdsbridge view``) from now on; every page is redrawn."""
        self.scene, self.config, self.step, self.steps, self.note = scene, config, step, None, note
        self.state = "checkpoint"
        with self.lock:
            for page in self.pages.values():
                page.frame.camera_version += 1
        self._show_status()

    def show_validation(self, path: Path) -> None:
        """The validation grid PNG at ``path`` in the panel."""
        self._guard("validation grid", lambda: self.panel.show_validation(path))

    def serve(self, until: Callable[[], bool], controls: Optional[LoopControls] = None) -> None:
        """Send every frame the pages need, without a budget, until ``until()`` (polled at least every 0.1 s);
        with ``controls`` (paused training) also honour save-now."""
        while not until():
            if controls is not None:
                self._save_if_asked(controls)
            if not self._send_next_frame(training=False):
                self.requests.changed.wait(0.05)
                self.requests.changed.clear()

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # viser prints "Server stopped"
            self.server.stop()

    # ---- frames --------------------------------------------------------------------------------------------
    def _send_next_frame(self, training: bool) -> bool:
        """Render and send one frame to the page that needs one most (a moved camera first); False if none does, or
        (``training``) if the budget allows none now."""
        if self.scene is None:
            return False
        mode, now = self.requests.mode, time.monotonic()
        with self.lock:
            wanted = []
            for page in self.pages.values():
                if page.camera is None or page.broken:
                    continue
                side = next_side(page.frame, self.step, now, self.settings.pacing, self.rate, mode,
                                 page.camera.aspect, training)
                if side is not None:
                    moved = page.frame.camera_version != page.frame.frame_version or page.frame.mode != mode
                    wanted.append((not moved, page.frame.frame_time, page, side, page.camera,
                                   page.frame.camera_version))
            if not wanted:
                return False
            resting, _, page, side, camera, version = min(wanted, key=lambda item: item[:2])
            if training and not self.budget.allows(moved=not resting):
                return False
        started = time.perf_counter()
        height, width = frame_size(side, camera.aspect)
        image = render_frame(self.scene, self.config, camera, mode, height, width)
        sent = self._guard("frame", lambda: page.client.scene.set_background_image(
            image, format="jpeg", jpeg_quality=90 if side >= 256 else 75))
        seconds = time.perf_counter() - started
        self.rate.update(mode, height * width, seconds)
        with self.lock:
            page.broken = not sent
            page.frame.frame_version, page.frame.frame_side, page.frame.mode = version, side, mode
            page.frame.frame_step, page.frame.frame_time = self.step, time.monotonic()
        self.frames_sent, self.frame_seconds = self.frames_sent + 1, self.frame_seconds + seconds
        if training:
            self.budget.spend(seconds)
        return True

    # ---- the panel -----------------------------------------------------------------------------------------
    def _show_status(self) -> None:
        self._guard("status", lambda: self.panel.show_status(
            status_text(self.state, self.step, self.steps, self.stage, self.metrics, self.note,
                        self.hook_seconds / self.train_seconds if self.train_seconds else None)))

    def _guard(self, what: str, action: Callable[[], object]) -> bool:
        """Run a call into viser; a failure (a page gone mid-send, a closed server) is a log line (once, until that
        call works again), never an error of the run. True if it went through."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the viewer must never stop a run
            if what not in self.failing:
                log.warning(f"viewer: {what} not sent ({type(exc).__name__}: {exc})")
            self.failing.add(what)
            return False
        self.failing.discard(what)
        return True

"""The NeRF scene (an implementation of ``base.Scene``): hash-grid field + background + renderer with its
occupancy grid; its state goes into checkpoints and comes back from them."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field as dataclass_field
from typing import Iterator, Optional

import torch

from sdsbridge.common.devices import module_device
from sdsbridge.common.checks import shorten
from sdsbridge.common.errors import UserError
from sdsbridge.scene.base import RenderOutput
from sdsbridge.scene.cameras import Cameras
from sdsbridge.scene.nerf.settings import RenderConfig, SceneConfig
from sdsbridge.scene.nerf import encoding
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.scene.nerf.renderer import Renderer


NERF_GROUPS = ("grid", "density", "color", "background")
"""The NeRF's optimizer groups, in order: hash grid, density head, colour head, background MLP."""


@dataclass
class NeRFScene:
    """What a run optimises (``field``, ``background``) and how it is rendered (``renderer``, which also
    holds the occupancy grid); ``learning_rates``: group name (``NERF_GROUPS``) -> learning rate."""

    field: NeRFField
    background: Background
    renderer: Renderer
    learning_rates: dict[str, float] = dataclass_field(default_factory=dict)

    @property
    def radius(self) -> float:
        return self.renderer.radius

    @property
    def training(self) -> bool:
        return self.renderer.training

    @property
    def device(self) -> torch.device:
        return module_device(self.field)

    def train(self, mode: bool = True) -> "NeRFScene":
        """Training mode (jittered samples) for all three parts, or eval mode with ``mode=False``."""
        self.field.train(mode)
        self.background.train(mode)
        self.renderer.train(mode)
        return self

    def eval(self) -> "NeRFScene":
        return self.train(False)

    @contextmanager
    def preview(self) -> Iterator[None]:
        """Eval mode, forked RNGs and an uncounted hash grid inside; the previous mode after (``Scene.preview``)."""
        device, mode = self.device, self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    self.field.encoding.uncounted():
                yield
        finally:
            self.train(mode)

    def render(self, cameras: Cameras, height: int, width: int, background_color: Optional[torch.Tensor] = None,
               chunk_rays: Optional[int] = None) -> RenderOutput:
        """``Renderer.render``."""
        return self.renderer.render(cameras, height, width, background_color=background_color, chunk_rays=chunk_rays)

    def param_groups(self) -> list[dict]:
        """One group per part (``NERF_GROUPS``: the field's 'grid', 'density', 'color', then 'background'), each
        with its learning rate (the official run's groups)."""
        params = {**self.field.param_groups(), "background": list(self.background.parameters())}
        return [{"params": params[name], "lr": self.learning_rates[name], "name": name} for name in NERF_GROUPS]

    def after_step(self, step: int) -> None:
        """The occupancy-grid refresh (a no-op for the stratified sampler)."""
        self.renderer.update_occupancy(step)

    @property
    def one_off_seconds(self) -> float:
        """The hash grid's kernel compile time so far (``encoding.compile_seconds``)."""
        return encoding.compile_seconds

    def prepare_long_run(self) -> None:
        """Compile the hash grid's CPU kernel from the first step (it pays off over a long run)."""
        self.field.encoding.compile_after_points = 0

    def prepare_for_points(self, n_points: int) -> None:
        """``prepare_long_run`` when ``n_points`` passes the encoding's eager budget (``compile_after_points``):
        a standalone export then runs at the speed the end of training has, without its first 2^21 points
        eager. (A field without a hash grid, e.g. a test's analytic shape, has nothing to compile.)"""
        grid = getattr(self.field, "encoding", None)
        if grid is not None and n_points > grid.compile_after_points:
            self.prepare_long_run()

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.field.density(points)

    def colour(self, points: torch.Tensor) -> torch.Tensor:
        return self.field.colour(points)

    def state_dict(self) -> dict[str, dict]:
        """{'field', 'background', 'renderer'} state dicts, as a checkpoint stores them."""
        return {"field": self.field.state_dict(), "background": self.background.state_dict(),
                "renderer": self.renderer.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Load field, background and renderer (occupancy grid) state from a checkpoint dict; UserError
        naming the first entry that does not fit this scene (a checkpoint of another scene config), with
        both shapes."""
        parts = {"field": self.field, "background": self.background, "renderer": self.renderer}
        for name in ("field", "background"):  # the renderer's grid is a cache: it is rebuilt when it differs
            _check_shapes(name, parts[name].state_dict(), checkpoint.get(name))
        try:
            for name, module in parts.items():
                module.load_state_dict(checkpoint[name])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise UserError(f"checkpoint does not match this config's scene: {shorten(str(exc), 300)}") from None


def _check_shapes(name: str, expected: dict, stored) -> None:
    """UserError at the first entry of ``expected`` (this scene's state dict for part ``name``) that ``stored``
    (the checkpoint's) lacks or holds with another type or shape, else at the first entry ``stored`` has in
    excess."""
    if not isinstance(stored, dict):
        raise UserError(f"checkpoint does not match this config's scene: '{name}' is a {type(stored).__name__}")
    for key, want in expected.items():
        have = stored.get(key)
        if have is None:
            raise UserError(f"checkpoint does not match this config's scene: {name}.{key} is missing in the "
                            "checkpoint")
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shape = list(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise UserError(f"checkpoint does not match this config's scene: {name}.{key} is {shape} in the "
                            f"checkpoint, {list(want.shape)} for this config")
    extra = [key for key in stored if key not in expected]
    if extra:
        raise UserError(f"checkpoint does not match this config's scene: {name}.{shorten(str(extra[0]), 80)} in the "
                        "checkpoint is not part of this scene")


def build_nerf_scene(scene_cfg: SceneConfig, render_cfg: RenderConfig, learning_rates: dict[str, float],
                     device: torch.device) -> NeRFScene:
    """Field, background and renderer on ``device`` (parameters drawn from torch's RNG, in that order)."""
    nerf = NeRFField(scene_cfg, device=device).to(device)
    background = Background(scene_cfg).to(device)
    renderer = Renderer(nerf, background, render_cfg, radius=scene_cfg.radius)
    return NeRFScene(nerf, background, renderer, dict(learning_rates))

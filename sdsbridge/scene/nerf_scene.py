"""The scene a run optimises and renders: field + background + renderer; built from a config; its state
goes into checkpoints and comes back from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdsbridge.config.schema import Config
from sdsbridge.common.errors import UserError
from sdsbridge.scene.nerf.background import Background
from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.scene.nerf.renderer import Renderer


@dataclass
class Scene:
    """What a run optimises (``field``, ``background``) and how it is rendered (``renderer``, which also
    holds the occupancy grid on CUDA)."""

    field: NeRFField
    background: Background
    renderer: Renderer

    def train(self, mode: bool = True) -> "Scene":
        """Training mode (jittered samples) for all three parts, or eval mode with ``mode=False``."""
        self.field.train(mode)
        self.background.train(mode)
        self.renderer.train(mode)
        return self

    def eval(self) -> "Scene":
        return self.train(False)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by optimizer group: 'grid', 'density', 'color' (the field's) and 'background'."""
        return {**self.field.param_groups(), "background": list(self.background.parameters())}

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
            raise UserError(f"checkpoint does not match this config's scene: {str(exc).splitlines()[0]}") from None


def _check_shapes(name: str, expected: dict, stored) -> None:
    """UserError at the first entry of ``stored`` (a checkpoint's state dict for part ``name``) whose
    type or shape differs from this scene's (``expected``)."""
    if not isinstance(stored, dict):
        raise UserError(f"checkpoint does not match this config's scene: '{name}' is a {type(stored).__name__}")
    for key, want in expected.items():
        have = stored.get(key)
        if have is None:
            continue  # missing entries: load_state_dict names them
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shape = list(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise UserError(f"checkpoint does not match this config's scene: {name}.{key} is {shape} in the "
                            f"checkpoint, {list(want.shape)} for this config")


def build_scene(config: Config, device: torch.device) -> Scene:
    """Field, background and renderer from the config, on ``device`` (parameters drawn from torch's RNG)."""
    field = NeRFField(config.scene, device=device).to(device)
    background = Background(config.scene).to(device)
    renderer = Renderer(field, background, config.render, radius=config.scene.radius)
    return Scene(field, background, renderer)

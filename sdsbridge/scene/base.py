"""The scene contract: what training, checkpoints and the exporters use of the thing a run optimises.

The NeRF (``nerf_scene.NeRFScene``) is one implementation; a 3D Gaussian scene or a mesh-refinement stage
would be another. ``training/`` (loop, step, checkpoints) and ``outputs/`` (meshes, turntables, evaluation)
only call what ``Scene`` lists here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Optional, Protocol

import torch
from torch import Tensor

from sdsbridge.scene.cameras import Cameras


@dataclass
class RenderOutput:
    """What ``Scene.render`` returns for N images of H x W pixels."""

    rgb: Tensor
    """[N, H, W, 3] colour composited over the background, in [0, 1]."""
    opacity: Tensor
    """[N, H, W, 1] accumulated weight (sum of the ray's weights), in [0, 1]; regularisers use it."""
    depth: Tensor
    """[N, H, W, 1] expected distance along the ray, sum_i w_i t_i (background counts as 0); divide by
    opacity for the distance to the surface."""
    background: Tensor
    """[N, H, W, 3] the background colour behind each pixel."""
    samples_per_ray: float
    """Mean number of field samples per ray (all rays, misses included)."""


class Scene(Protocol):
    """A scene: rendered from cameras, optimised by parameter groups, saved in checkpoints, and queried by
    the exporters for density and colour at world points."""

    radius: float
    """The scene's bound in world units: it lies in the sphere (and the cube [-radius, radius]^3) of this radius."""
    training: bool
    """Training mode (jittered samples) or eval mode (deterministic)."""

    @property
    def device(self) -> torch.device:
        """Where its parameters live (cameras go there before ``render``)."""

    def train(self, mode: bool = True) -> "Scene":
        """Training mode, or eval mode with ``mode=False``; returns the scene."""

    def eval(self) -> "Scene":
        """``train(False)``."""

    def render(self, cameras: Cameras, height: int, width: int, background_color: Optional[Tensor] = None,
               chunk_rays: Optional[int] = None) -> RenderOutput:
        """N = len(cameras) images of ``height`` x ``width`` pixels, differentiable with respect to
        ``param_groups``' parameters. ``background_color``: [N, 3] or [3] solid colour instead of the scene's
        own background; ``chunk_rays``: rays per pass (None: the scene's default)."""

    def preview(self) -> ContextManager[None]:
        """A context for renders that must leave training exactly as it was (a live viewer's): eval mode inside,
        the global RNGs (the scene device's too) restored after, no one-off bookkeeping advanced (the NeRF's
        compile counter); the previous mode is restored after. Wrap it in ``torch.no_grad()``."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups ``{"params": [...], "lr": float, "name": str}`` (betas, eps and weight decay are the
        trainer's)."""

    def after_step(self, step: int) -> None:
        """Housekeeping after the optimizer step of ``step`` (the NeRF: its occupancy-grid refresh; a Gaussian
        scene: densification)."""

    @property
    def one_off_seconds(self) -> float:
        """Seconds spent so far on one-off work inside steps (the NeRF: compiling its hash-grid kernel); when it
        grows, the progress bar leaves that step out of its rate."""

    def prepare_long_run(self) -> None:
        """Called once before a long CPU run (the NeRF compiles its hash-grid kernel from the first step)."""

    def prepare_for_points(self, n_points: int) -> None:
        """Called by a command about to evaluate about ``n_points`` field points (a mesh grid, a turntable's
        rays): the NeRF compiles its kernel up front when it would compile part-way through anyway."""

    def state_dict(self) -> dict:
        """What a checkpoint stores of the scene (top-level entries of the checkpoint)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output; UserError naming the first entry that does not fit."""

    def density(self, points: Tensor) -> Tensor:
        """[M, 3] world points -> [M] density (per unit length, >= 0) on the scene's device, for meshes and normals."""

    def colour(self, points: Tensor) -> Tensor:
        """[M, 3] world points -> [M, 3] rgb in [0, 1], for mesh vertex colours and textures."""

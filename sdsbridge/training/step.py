"""One optimisation step, shared by the 3D trainer, the benchmark and the 2D image mode.

``train_step`` distils latents with a method, adds the method's own losses and any regularisers, and
takes one AdamW step unless the loss or a gradient is not finite. The 3D step (``scene_step``) renders the
scene from random cameras first (``render_views``) and refreshes the occupancy grid after; the 2D mode
calls ``train_step`` on its image latent directly.

Random numbers are drawn in a fixed order (cameras, ray jitter, background colours, the encoder's sample,
then t and noise inside ``Method.distill``), so a seed fixes a run.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sdsbridge.scene.cameras import Cameras, camera_rays, sample_cameras
from sdsbridge.scene.nerf.field import finite_difference_normals
from sdsbridge.config.schema import Config, LossConfig, TrainConfig
from sdsbridge.distill.methods import DistillResult, Method
from sdsbridge.scene.base import RenderOutput, Scene
from sdsbridge.distill.prompts import PromptEmbeddings
from sdsbridge.scene.nerf_scene import NeRFScene, build_nerf_scene
from sdsbridge.common.schedules import schedule_value

Timer = Callable[[str], AbstractContextManager]
"""``timer(section)`` wraps a named part of a step ('render', 'backward', 'optimizer', 'occupancy'); the
benchmark passes one that measures, everyone else ``untimed``."""


def untimed(section: str) -> AbstractContextManager:
    return nullcontext()


def build_scene(config: Config, device: torch.device) -> NeRFScene:
    """The config's scene on ``device``: the NeRF of ``scene:`` and ``render:``, with the learning rates of
    ``train:`` (parameters drawn from torch's RNG)."""
    t = config.train
    learning_rates = {"grid": t.lr_grid, "density": t.lr_density, "color": t.lr_color, "background": t.lr_background}
    return build_nerf_scene(config.scene, config.render, learning_rates, device)


def build_optimizer(scene: Scene, method: Method, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the scene's parameter groups (``Scene.param_groups``, each with its learning rate; the NeRF's
    are the official run's: hash grid, density head, colour head, background), then the method's own groups
    (``Method.param_groups``); betas, eps and weight decay shared. PyTorch's fused AdamW where it runs (same
    update, last bits may differ from the loop's)."""
    groups = scene.param_groups() + method.param_groups()
    # The fused kernel (one pass per tensor; 0.6 vs 2.8 ms per step for the demo on a CPU thread) runs on
    # CPU and CUDA float tensors; anything else gets the default loop.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def regularizer_losses(opacity: torch.Tensor, step: int, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Weighted sparsity (mean sqrt(opacity^2 + 0.01)) and opacity BCE (pushes opacity to 0 or 1) of
    [N, H, W, 1] opacity; only the terms whose scheduled weight is > 0 at ``step``."""
    losses = {}
    w_sparsity = schedule_value(cfg.sparsity, step)
    if w_sparsity > 0:
        losses["sparsity"] = w_sparsity * torch.sqrt(opacity ** 2 + 0.01).mean()
    w_opacity = schedule_value(cfg.opacity, step)
    if w_opacity > 0:
        clamped = opacity.clamp(1e-3, 1.0 - 1e-3)
        losses["opacity"] = w_opacity * F.binary_cross_entropy(clamped, clamped)
    return losses


FD_STEP_CELLS = 64
"""The smallest normal step: the scene cube's width / this (``normal_step``)."""


def cube_normal_step(radius: float) -> float:
    """The normals' central-difference step (world units) that needs no config: 1/FD_STEP_CELLS of the cube of a
    scene of ``radius``; ``normal_step``'s floor."""
    return 2.0 * radius / FD_STEP_CELLS


def normal_step(config: Config, radius: float) -> float:
    """The "finite" normals' central-difference step (world units) for a scene of ``radius`` trained with
    ``config``: max(2 * radius / FD_STEP_CELLS, the pixel footprint of the finest images the prior saw at the
    farthest camera distance and widest field of view, 2 * d * tan(fovy / 2) / resolution). Those images are
    the final training renders, resized to the prior's own resolution where it sets one and is smaller (the
    reference prior's ``prior.resolution``; Stable Diffusion's 512 px exceeds the renders)."""
    resolution = schedule_value(config.render.resolution, config.train.steps)
    prior_resolution = getattr(config.prior, "resolution", None)
    if prior_resolution:
        resolution = min(resolution, prior_resolution)
    distance, fovy = max(config.cameras.distance_range), max(config.cameras.fovy_range)
    footprint = 2.0 * distance * math.tan(math.radians(fovy) / 2.0) / resolution
    return max(cube_normal_step(radius), footprint)


def normal_smoothness_loss(scene: Scene, cameras: Cameras, out: RenderOutput, n_points: int,
                           step_size: float) -> torch.Tensor:
    """Mean |n(x) - n(x + d)| over up to ``n_points`` surface points x: the expected termination points of
    the rays with opacity > 0.5 (detached), n = -grad(density)/|grad(density)| by central differences with
    ``step_size`` (world units), d ~ N(0, step_size^2 I) projected on the tangent plane at x (so x + d stays
    near the surface, not in empty space where the density has no gradient). Scalar on the scene's device;
    0 without a surface.

    Textureless faces leave depth unconstrained by the prior (any bump renders the same colour), so their
    density is free to wander; this prefers surfaces whose orientation changes slowly at the scale the prior
    resolves. The gradient reaches the field through the twelve density probes per point (six around x, six
    around x + d). Selecting the surface pixels syncs with the device once (off in the official recipe)."""
    height, width = out.opacity.shape[1:3]
    origins, dirs = camera_rays(cameras, height, width)
    opacity, depth = out.opacity.detach()[..., 0], out.depth.detach()[..., 0]
    hit = opacity > 0.5
    points = (origins[hit] + dirs[hit] * (depth[hit] / opacity[hit])[:, None])
    if points.shape[0] == 0:
        return opacity.new_zeros(())
    if points.shape[0] > n_points:
        points = points[torch.randperm(points.shape[0], device=points.device)[:n_points]]
    normals = finite_difference_normals(scene.density, points, step_size)
    across = torch.randn_like(points)
    along = normals.detach()
    near = points + step_size * (across - (across * along).sum(-1, keepdim=True) * along)  # in the tangent plane
    return (normals - finite_difference_normals(scene.density, near, step_size)).norm(dim=-1).mean()


def with_random_backgrounds(out: RenderOutput, probability: float) -> torch.Tensor:
    """[N, H, W, 3] rgb where each image's background is, with ``probability``, replaced by a random solid
    colour (so the field cannot paint the background into the object). Always draws the same random
    numbers, whatever the outcome, so runs stay reproducible."""
    n, cpu = out.rgb.shape[0], torch.device("cpu")  # drawn on the CPU's global RNG, as the cameras
    use_solid = (torch.rand(n, device=cpu) < probability).to(out.rgb.device)
    colors = torch.rand(n, 3, device=cpu).to(out.rgb.device)
    transparency = 1.0 - out.opacity
    recomposited = out.rgb - transparency * out.background + transparency * colors[:, None, None, :]
    return torch.where(use_solid[:, None, None, None], recomposited, out.rgb)


def loss_and_grads_finite(loss: torch.Tensor, parameters: list[torch.Tensor]) -> bool:
    """Whether the loss and every gradient are finite (one host sync when they are).

    A NaN or inf term makes its sum NaN or inf, so finite sums of the gradients prove every element finite:
    one pass over them instead of isfinite's four (0.02 vs 1.6 ms for the demo's hash table on a CPU
    thread). Only when a sum is not finite, which finite values can reach by overflowing, is every element
    checked."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sums = torch.stack([loss.detach().float().reshape(())] + [g.sum().float().to(loss.device) for g in grads])
    if bool(torch.isfinite(sums).all()):
        return True
    checks = [torch.isfinite(loss).reshape(1)]
    checks += [torch.isfinite(g).all().reshape(1).to(loss.device) for g in grads]
    return bool(torch.cat(checks).all())


@dataclass
class StepResult:
    """What ``train_step`` did."""

    loss: torch.Tensor
    """Scalar: the sum of ``losses``."""
    losses: dict[str, torch.Tensor]
    """'guidance', the method's extra losses, then the regularisers, each a scalar on the optimised
    parameters' device."""
    distill: DistillResult
    """What ``Method.distill`` returned (t, stage, the injected gradient's norm)."""
    finite: bool
    """False when the loss or a gradient was not finite: the step was skipped (gradients zeroed)."""


def non_finite_cause(method: Method, result: StepResult,
                     keys: Optional[dict[str, str]] = None) -> tuple[str, str]:
    """(what was not finite, what to try) for a skipped step: a guidance gradient that was NaN or inf everywhere
    names the settings that scale it (``Method.scale_settings``) with their values; anything else (the loss, a
    parameter's gradient) the usual suspects. ``keys``: the config key of each setting that is not
    ``guidance.<name>`` (the 2D mode's ``image.guidance_scale``). Reads one flag from the device: call it for
    skipped steps only."""
    flag = result.distill.guidance_finite
    if flag is not None and not bool(flag):
        names = method.scale_settings(result.distill.stage)
        named = " or ".join(f"{(keys or {}).get(name, f'guidance.{name}')} (now {getattr(method.settings, name):g})"
                            for name in names)
        advice = f"lower {named}" if names else "lower the guidance scale"
        return "the guidance gradient was NaN or inf everywhere", advice
    return "a non-finite loss or gradient", "try lower learning rates or guidance scale"


@dataclass
class BadSteps:
    """The non-finite steps of a run (3D) or a seed (2D): each is skipped and counted; ``limit`` in a row stop it."""

    limit: int
    """Non-finite steps in a row that stop the run (``train.max_bad_steps``, ``image.max_bad_steps``)."""
    total: int = 0
    """Non-finite steps so far (a resumed run starts from its checkpoint's count)."""
    in_row: int = 0
    cause: str = ""
    """What was not finite at the last bad step ('' before one)."""
    advice: str = ""
    """What to try about it."""

    def record(self, method: Method, result: StepResult, keys: Optional[dict[str, str]] = None) -> bool:
        """Count one step; True when it was the ``limit``-th non-finite step in a row. ``keys``: as in
        ``non_finite_cause`` (read for bad steps only: it waits for one flag from the device)."""
        if result.finite:
            self.in_row = 0
            return False
        self.total, self.in_row = self.total + 1, self.in_row + 1
        self.cause, self.advice = non_finite_cause(method, result, keys)
        return self.in_row >= self.limit


def train_step(method: Method, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
               conditions: dict[str, torch.Tensor], step: int, cameras: Optional[Cameras] = None,
               losses: Optional[dict[str, torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
               timer: Timer = untimed) -> StepResult:
    """Distil ``latents`` [N, C, h, w] (with grad to what ``optimizer`` optimises) with ``method`` at
    ``step``, add the method's extra losses and ``losses`` (regularisers), backpropagate, and take an
    optimizer step if the loss and every gradient are finite (else zero the gradients and skip).

    ``conditions``: role -> [N, ...] (``PromptEmbeddings.conditions``); ``cameras``: the N cameras the
    latents were rendered from (None in 2D); ``generator``: draws t and noise (None: the global RNG).
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    device = parameters[0].device  # the prior may sit on another device: sum the losses here
    distilled = method.distill(latents, conditions, step, cameras, generator)
    terms = {"guidance": distilled.loss, **distilled.extra_losses, **(losses or {})}
    terms = {name: value.to(device) for name, value in terms.items()}
    loss = sum(terms.values())

    optimizer.zero_grad(set_to_none=True)
    with timer("backward"):
        loss.backward()  # a non-finite loss gives non-finite gradients: checked together below
    finite = loss_and_grads_finite(loss, parameters)
    with timer("optimizer"):
        if finite:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, terms, distilled, finite)


@dataclass
class Views:
    """One 3D step's renders, encoded for the prior: what ``train_step`` distils."""

    latents: torch.Tensor
    """[N, C, h, w] ``prior.encode_images`` of the renders (with random backgrounds), on the prior's device."""
    conditions: dict[str, torch.Tensor]
    """role -> [N, ...] conditions picked by each camera's view label."""
    cameras: Cameras
    """The N random training cameras."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """The regularisers of the renders' opacity (``regularizer_losses``)."""
    resolution: int = 0
    """Render height and width in pixels (scheduled ``render.resolution``)."""
    samples_per_ray: float = 0.0
    """Mean field samples per ray of the render."""


def render_views(scene: Scene, method: Method, prompts: PromptEmbeddings, config: Config, step: int,
                 timer: Timer = untimed) -> Views:
    """``train.batch_size`` random cameras -> renders at the scheduled resolution -> random solid
    backgrounds (``scene.random_background_prob``) -> ``method.prior.encode_images``, plus the
    regularisers of the renders' opacity."""
    with timer("render"):
        drawn = sample_cameras(config.cameras, config.train.batch_size)  # on the CPU
        # The conditions read the azimuths on the host (view blend, Perp-Neg): from the CPU copy, so no device sync.
        conditions = prompts.conditions(drawn.labels, drawn.azimuth)
        cameras = drawn.to(scene.device)
        resolution = int(round(schedule_value(config.render.resolution, step)))
        out = scene.render(cameras, resolution, resolution)
        images = with_random_backgrounds(out, config.scene.random_background_prob).permute(0, 3, 1, 2)
        losses = regularizer_losses(out.opacity, step, config.loss)
        w_normals = schedule_value(config.loss.normal_smoothness, step)
        if w_normals > 0:
            losses["normal_smoothness"] = w_normals * normal_smoothness_loss(
                scene, cameras, out, config.loss.normal_points, normal_step(config, scene.radius))
    latents = method.prior.encode_images(images)  # [N, 3, H, W] -> [N, C, h, w]
    return Views(latents, conditions, cameras, losses, resolution, out.samples_per_ray)


def scene_step(scene: Scene, method: Method, prompts: PromptEmbeddings, optimizer: torch.optim.Optimizer,
               config: Config, step: int, timer: Timer = untimed) -> tuple[Views, StepResult]:
    """One 3D training step: ``render_views``, ``train_step``, then the scene's ``after_step`` (the NeRF's
    occupancy-grid refresh)."""
    views = render_views(scene, method, prompts, config, step, timer)
    result = train_step(method, optimizer, views.latents, views.conditions, step, views.cameras, views.losses,
                        timer=timer)
    with timer("occupancy"):
        scene.after_step(step)
    return views, result

"""Interval Score Matching (LucidDreamer, Liang et al., CVPR 2024), as the authors' released code does it.

Instead of noising the render x_0 to x_t with fresh noise, ISM walks it there deterministically: DDIM
inversion (eta = 0) from timestep 0 to s = t - delta_T in strides of delta_S (at most ``inversion_steps``
UNet calls on the inversion prompt, the empty one), then one more inversion step from s to t. The gradient
compares the guided prediction at x_t with the inversion's own prediction at x_s:

    g = lambda w(t) (eps_cfg(x_t; y, t) - eps(x_s; empty, s)),   w(t) = sqrt((1 - abar_t) / abar_t),

where eps_cfg = eps(x_t; y_neg) + scale (eps(x_t; y) - eps(x_t; y_neg)) with the negative prompt as CFG's
unconditional branch (the authors' default is the empty prompt) and lambda = ``grad_scale``. The sampled noise
only lifts x_0 to timestep 0 before the inversion; delta_T anneals linearly from ``delta_t_start`` to
``delta_t`` over ``delta_t_warmup_steps`` (truncated to an integer, as the official ``int(...)``).

Differences from the official code (LucidDreamer/guidance/sd_utils.py, train_step): timesteps are indices of
the noise schedule as in every method here (the official code feeds index + 1 to the UNet and to abar), each
image of a batch draws its own t (the official batch shares one), and an image whose s is reached early
keeps its latent while the others finish their strides (the official loop stops).

On the reference prior (an exact denoiser that remembers its images) the x_0 prediction along a DDIM path is
nearly constant, so eps(x_t) and eps(x_s) nearly agree and the gradient nearly vanishes: a 2D image started
from noise stays noise there (the 3D runs of ``compare_methods.py`` do learn the shapes). Stable Diffusion's
predictions change along the path, which is what ISM relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sdsbridge.common.checks import check
from sdsbridge.distill.formulas import predict_batched
from sdsbridge.distill.methods.base import DistillResult, Method, MethodSettings, register_method
from sdsbridge.priors.base import noisy_latents
from sdsbridge.scene.cameras import Cameras


@dataclass
class ISMSettings(MethodSettings):
    """ISM's ``guidance:`` settings; defaults are the authors' (arguments/__init__.py and the configs/*.yaml
    their README runs: lambda_guidance 0.1 in every one)."""

    max_step_percent: Any = field(default_factory=lambda: [0, 0.98, 0.5, 1500])
    """Upper end of t / T, annealed from 0.98 to 0.5 over the first 1500 steps (``max_t_range``, ``t_range``,
    ``warmup_iter``)."""
    cfg_on_target: bool = False
    """CFG between the plain prompt and the negative prompt (the official code appends no target modifier)."""
    guidance_scale: float = 7.5
    """CFG scale of the prediction at x_t (``guidance_scale``)."""
    negative_prompt: str = ""
    """CFG's unconditional branch at x_t (``negative``; the code's default is empty)."""
    delta_t: int = 80
    """delta_T after the warm-up: s = t - delta_T (``delta_t``)."""
    delta_t_start: int = 100
    """delta_T at step 0 (``delta_t_start``)."""
    delta_t_warmup_steps: int = 1500
    """Steps over which delta_T goes linearly from ``delta_t_start`` to ``delta_t`` (``warmup_iter``)."""
    delta_s: int = 200
    """Stride of the DDIM inversion from 0 to s, in timesteps (``xs_delta_t``)."""
    inversion_steps: int = 5
    """Most inversion strides (``xs_inv_steps``); s above ``delta_s * inversion_steps`` is not reached."""
    inversion_guidance_scale: float = 1.0
    """Guidance of the inversion (``denoise_guidance_scale``): 1 or less inverts on the empty prompt alone; above
    1, eps(empty) + scale (eps(negative) - eps(empty)), the official "reverse guidance"."""
    grad_scale: float = 0.1
    """lambda, the gradient's multiplier (``lambda_guidance``)."""

    def validate(self) -> None:
        check(self.guidance_scale >= 0, "guidance.guidance_scale", "must be >= 0")
        check(0 <= self.delta_t <= 999, "guidance.delta_t", "must lie in [0, 999]")
        check(0 <= self.delta_t_start <= 999, "guidance.delta_t_start", "must lie in [0, 999]")
        check(self.delta_t_warmup_steps >= 0, "guidance.delta_t_warmup_steps", "must be >= 0")
        check(self.delta_s >= 1, "guidance.delta_s", "must be >= 1")
        check(1 <= self.inversion_steps <= 100, "guidance.inversion_steps", "must lie in [1, 100]")
        check(self.inversion_guidance_scale >= 0, "guidance.inversion_guidance_scale", "must be >= 0")
        check(self.grad_scale >= 0, "guidance.grad_scale", "must be >= 0")
        super().validate()


def interval(step: int, settings: ISMSettings) -> int:
    """delta_T at ``step``: int(delta_t + r (delta_t_start - delta_t)), r = 1 - min(step / warm-up, 1)."""
    warm_up = settings.delta_t_warmup_steps
    rate = 1.0 - min(step / warm_up, 1.0) if warm_up > 0 else 0.0
    return int(settings.delta_t + rate * (settings.delta_t_start - settings.delta_t))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from one timestep to another, either way: x0 = (x - sqrt(1 - a) eps) / sqrt(a),
    then sqrt(a') x0 + sqrt(1 - a') eps; ``abar_*`` broadcast against x ([N, 1, 1, 1])."""
    x0 = (x - (1.0 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1.0 - abar_to).sqrt() * eps


def ism_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """w(t) = sqrt((1 - abar_t) / abar_t) as [N, 1, 1, 1]."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return ((1.0 - abar) / abar) ** 0.5


@register_method
class ISM(Method):
    """Interval Score Matching; see the module docstring. Prompt roles 'cond', 'uncond' (the negative prompt)
    and 'inverse' (the empty prompt, never with a view suffix). One stage, no parameters of its own."""

    name = "ism"
    summary = "Interval Score Matching (LucidDreamer): DDIM inversion to x_s and x_t instead of noise"
    Settings = ISMSettings
    view_independent_roles = ("inverse",)

    def __init__(self, settings: Optional[ISMSettings | dict], prior):
        super().__init__(settings, prior)
        self.delta_t = interval(0, self.settings)

    def role_texts(self, prompt: str) -> dict[str, str]:
        return {**super().role_texts(prompt), "uncond": self.settings.negative_prompt.strip(), "inverse": ""}

    def distill(self, latents: torch.Tensor, conditions: dict[str, torch.Tensor], step: int,
                cameras: Optional[Cameras] = None, generator: Optional[torch.Generator] = None) -> DistillResult:
        """The base class's ``distill`` with delta_T of ``step``."""
        self.delta_t = interval(step, self.settings)
        return super().distill(latents, conditions, step, cameras, generator)

    def _inversion_noise(self, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor],
                         cameras: Optional[Cameras]) -> torch.Tensor:
        """The inversion's noise prediction at (x, t): the empty prompt's, with reverse guidance above scale 1."""
        scale = self.settings.inversion_guidance_scale
        if scale <= 1.0:
            return predict_batched(self.prior, x, t, [conditions["inverse"]], cameras)[0]
        eps_empty, eps_negative = predict_batched(self.prior, x, t, [conditions["inverse"], conditions["uncond"]], cameras)
        return eps_empty + scale * (eps_negative - eps_empty)

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        abar = self.prior.alphas_cumprod
        t = t.to(self.prior.device)
        s = (t - self.delta_t).clamp(min=0)
        x = noisy_latents(latents, torch.zeros_like(t), noise, abar)  # x_0 lifted to timestep 0
        current = torch.zeros_like(t)
        for _ in range(self.settings.inversion_steps):  # x_0 -> x_s in strides of delta_S
            target = torch.minimum(current + self.settings.delta_s, s)
            eps = self._inversion_noise(x, current, conditions, cameras)
            moved = ddim_step(x, eps, abar[current].view(-1, 1, 1, 1), abar[target].view(-1, 1, 1, 1))
            x = torch.where((current < s).view(-1, 1, 1, 1), moved, x)
            current = target
        eps_s = self._inversion_noise(x, s, conditions, cameras)
        x_t = ddim_step(x, eps_s, abar[s].view(-1, 1, 1, 1), abar[t].view(-1, 1, 1, 1))
        eps = predict_batched(self.prior, x_t, t, [conditions[role] for role in self.cfg_roles(conditions)], cameras)
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        eps_guided = eps_uncond + self.settings.guidance_scale * (eps_cond - eps_uncond)
        return self.settings.grad_scale * (ism_weight(t, abar) * (eps_guided - eps_s))

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        return ("guidance_scale", "grad_scale")

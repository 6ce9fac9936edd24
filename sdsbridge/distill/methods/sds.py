"""Score Distillation Sampling (DreamFusion) with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.distill.formulas import sds_gradient, weight
from sdsbridge.common.checks import check, check_choice
from sdsbridge.distill.methods.base import WEIGHTINGS, Method, MethodSettings, register_method


@dataclass
class SDSSettings(MethodSettings):
    """SDS's ``guidance:`` settings."""

    guidance_scale: float = 100.0
    """CFG scale omega (DreamFusion's 100; the official bridge run's stage one too)."""
    weighting: str = "sds"
    """w(t): 'sds' (1 - alphas_cumprod[t]) or 'uniform' (1)."""

    def validate(self) -> None:
        check(self.guidance_scale >= 0, "guidance.guidance_scale", "must be >= 0")
        check_choice(self.weighting, "guidance.weighting", WEIGHTINGS)
        super().validate()


@register_method
class SDS(Method):
    """g = w(t) (eps(0) + scale (eps(y) - eps(0)) - eps): prompt roles 'cond' and 'uncond', one stage.

    Settings: ``guidance_scale`` (CFG scale), ``weighting`` (w(t): 'sds' = 1 - abar_t or 'uniform'), and
    the base class's.
    """

    name = "sds"
    summary = "Score Distillation Sampling (DreamFusion): CFG towards the prompt"
    Settings = SDSSettings

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        t = t.to(self.prior.device)
        eps = self.predict(latents, t, noise, conditions, self.cfg_roles(conditions), cameras)
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        w = weight(t, self.prior.alphas_cumprod, self.settings.weighting)
        return sds_gradient(eps_cond, eps_uncond, noise, w, self.settings.guidance_scale)

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        return ("guidance_scale",)

"""Noise-Free Score Distillation (Katzir et al. 2024), a baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.distill.formulas import nfsd_gradient, weight
from sdsbridge.common.checks import check, check_choice
from sdsbridge.distill.methods.base import WEIGHTINGS, Method, MethodSettings, register_method

NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
"""NFSD's negative prompt (the paper's)."""


@dataclass
class NFSDSettings(MethodSettings):
    """NFSD's ``guidance:`` settings (its preset configs/nfsd.yaml sets the paper's scale 7.5)."""

    guidance_scale: float = 100.0
    """CFG scale of eps(y) - eps(0)."""
    weighting: str = "sds"
    """w(t): 'sds' (1 - alphas_cumprod[t]) or 'uniform' (1)."""
    nfsd_negative: str = NFSD_NEGATIVE
    """The negative prompt y_neg."""

    def validate(self) -> None:
        check(self.guidance_scale >= 0, "guidance.guidance_scale", "must be >= 0")
        check_choice(self.weighting, "guidance.weighting", WEIGHTINGS)
        super().validate()


@register_method
class NFSD(Method):
    """g = w(t) (scale (eps(y) - eps(0)) + delta), delta = eps(0) for t < 200 and eps(0) - eps(y_neg)
    above: prompt roles 'cond', 'uncond' and 'negative' (3 predictions per sample, one batched call).

    Settings: ``guidance_scale``, ``weighting``, ``nfsd_negative`` (y_neg), and the base class's.
    """

    name = "nfsd"
    summary = "Noise-Free Score Distillation (Katzir et al.), a baseline"
    Settings = NFSDSettings

    def role_texts(self, prompt: str) -> dict[str, str]:
        return {**super().role_texts(prompt), "negative": self.settings.nfsd_negative.strip()}

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        t = t.to(self.prior.device)
        *eps, eps_neg = self.predict(latents, t, noise, conditions, self.cfg_roles(conditions) + ("negative",), cameras)
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        w = weight(t, self.prior.alphas_cumprod, self.settings.weighting)
        return nfsd_gradient(eps_cond, eps_uncond, eps_neg, t, w, self.settings.guidance_scale)
